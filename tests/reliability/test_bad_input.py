"""The bad-input table: every entry point, each case exits non-zero with exactly one line
(``error: ...``) that names the problem and the fix, shows no traceback unless --debug, and
leaves no MLflow run RUNNING.

Most cases run in-process through click's CliRunner (fast); a handful that need a real
process (a NaN loss, an unreachable tracking server, a file the user may not read, a pickle
that carries code, --debug) run as real subprocesses, started together.
"""

from __future__ import annotations

import gzip
import importlib
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from tests.reliability.conftest import child_env, running
from tests.synthetic import idx_bytes, synthetic_digits

MOCO = ["--width", "4", "--batch-size", "64", "--moco-k", "128", "--bn-splits", "4", "--epochs", "1",
        "--no-progress"]  # fmt: skip
B, M, L, H, R, W, S = "baseline", "moco_pretrain", "linear_eval", "hpo", "report", "main", "semisup"
SEED_FIX = r"range 0<=x<=4294967295"
ESCAPE_FIX = r"no / and no \.\."
UNWRITABLE = r"cannot create or write this folder \(No such file or directory\)"
WRITE_FIX = r"pass a folder this user can write"

# (id, entry point, arguments, problem named (regex), fix named (regex)); {data}, {bad}, {tmp}
# are filled in: the synthetic data, the folder of broken inputs, the test's temp folder.
CASES = [
    ("epochs-out-of-range", B, ["--epochs", "0"], r"--epochs.*0", r"range 1<=x"),
    ("lr-not-a-number", B, ["--lr", "abc"], r"--lr.*'abc'", r"valid float"),
    ("epochs-not-an-integer", B, ["--epochs", "1.5"], r"--epochs.*1\.5", r"valid integer"),
    ("unknown-model", B, ["--model", "resnet"], r"--model.*'resnet'", r"one of.*mlp1"),
    ("batch-size-zero", B, ["--batch-size", "0"], r"--batch-size.*0", r"range 1<=x"),
    ("augment-strength-too-high", B, ["--augment-strength", "9"], r"--augment-strength.*9", r"0<=x<=3"),
    ("tta-views-negative", B, ["--tta-views", "-1"], r"--tta-views.*-1", r"0<=x<=64"),
    ("labels-per-class-1", B, ["--labels-per-class", "1"], r"--labels-per-class.*1", r"range 2<=x"),
    ("unknown-option", B, ["--epoch", "3"], r"No such option '--epoch'", r"Did you mean '--epochs'"),
    ("data-dir-missing", B, ["--data-dir", "{tmp}/nowhere"], r"nowhere is not a directory", r"point it at"),
    ("idx-file-missing", B, ["--data-dir", "{bad}/missing"], r"MNIST not found", r"pass --data-dir"),
    ("idx-truncated", B, ["--data-dir", "{bad}/truncated"], r"truncated or padded IDX", r"replace it"),
    ("idx-wrong-magic", B, ["--data-dir", "{bad}/magic"], r"wrong magic number 2049", r"expected 2051"),
    ("idx-gzip-corrupt", B, ["--data-dir", "{bad}/gzip"], r"gzip file is corrupt", r"replace it"),
    ("data-dir-read-only-empty", B, ["--data-dir", "{bad}/readonly"], r"MNIST not found in .*readonly",
     r"pass --data-dir"),
    ("lr-too-large", B, ["--lr", "1e30"], r"--lr.*1e\+30", r"0<x<=10"),
    ("tracking-uri-unreachable", B, ["--data-dir", "{data}", "--epochs", "1"],
     r"tracking store http://127.0.0.1:9 cannot be reached", r"start the tracking server"),
    ("moco-k-too-small", M, [*MOCO, "--moco-k", "8"], r"--moco-k 8", r"between 16 and"),
    ("moco-m-out-of-range", M, [*MOCO, "--moco-m", "1.5"], r"--moco-m 1.5", r"\[0, 1\)"),
    ("moco-t-zero", M, [*MOCO, "--moco-t", "0"], r"--moco-t 0", r"between 0.01 and 10"),
    ("unknown-arch", M, [*MOCO, "--arch", "vgg"], r"--arch.*'vgg'", r"one of"),
    ("resume-missing", M, [*MOCO, "--resume", "{tmp}/missing.pt"], r"no such checkpoint", r"--resume"),
    ("resume-corrupt", M, [*MOCO, "--resume", "{bad}/corrupt.pt"], r"not a readable checkpoint",
     r"delete it or pass another"),
    ("resume-foreign", M, [*MOCO, "--resume", "{bad}/foreign.pt"], r"not a fewshot MoCo checkpoint",
     r"pass a checkpoint"),
    ("resume-other-settings", M, [*MOCO, "--width", "8", "--resume", "{bad}/moco-w4.pt"],
     r"other settings \(width 4 -> 8\)", r"rerun with them or start fresh"),
    ("moco-batch-larger-than-pool", M, [*MOCO, "--batch-size", "4096", "--moco-k", "8192"],
     r"--batch-size 4096: larger than the unlabeled pool", r"smaller --batch-size"),
    ("registry-name-missing", L, ["--encoder", "models:/no-such-model/1"], r"no-such-model",
     r"registered models here|no model is registered"),
    ("registry-alias-missing", L, ["--encoder", "models:/fewshot-moco-encoder@nosuch"], r"@nosuch",
     r"try models:/fewshot-moco-encoder@champion"),
    ("run-uri-missing", L, ["--encoder", "runs:/0123456789abcdef0123456789abcdef/encoder"],
     r"runs:/0123456789abcdef0123456789abcdef/encoder", r"check the run id"),
    ("encoder-file-corrupt", L, ["--encoder", "{bad}/corrupt.pt"], r"corrupt\.pt", r"corrupt or truncated"),
    ("encoder-file-foreign", L, ["--encoder", "{bad}/foreign.pt"], r"not a fewshot MoCo checkpoint",
     r"pass a file written by moco_pretrain"),
    ("unknown-probe", L, ["--encoder", "{bad}/moco-w4.pt", "--probe", "svm"], r"--probe.*'svm'", r"one of"),
    ("hpo-unknown-target", H, ["--target", "nope"], r"--target.*'nope'", r"one of"),
    ("hpo-budget-unparsable", H, ["--budget", "3 hours"], r"--budget 3 hours", r"write a number of epochs"),
    ("hpo-one-fold", H, ["--folds", "1"], r"--folds 1", r"use 2 to 20 folds"),
    ("hpo-bad-study-name", H, ["--study-name", "bad name!"], r"--study-name 'bad name!'", r"letters, digits"),
    ("hpo-storage-unreachable", H, ["--n-trials", "0", "--encoder", "{bad}/moco-w4.pt", "--data-dir", "{data}",
                                    "--storage", "postgresql://u:pw@127.0.0.1:9/db"],
     r"--storage postgresql://u:\*\*\*@127.0.0.1:9/db", r"that this machine can reach"),
    ("hpo-storage-unknown-scheme", H, ["--n-trials", "0", "--encoder", "{bad}/moco-w4.pt", "--data-dir", "{data}",
                                       "--storage", "bogus://x"], r"--storage bogus://x", r"pass a sqlite:///"),
    ("report-unknown-run", R, ["--parent-run-id", "0123456789abcdef0123456789abcdef"],
     r"0123456789abcdef0123456789abcdef", r"--parent-run-id"),
    ("report-no-workflow", R, [], r"no workflow run", r"mlflow run . -e main"),
    ("main-draws-zero", W, ["--draws", "0"], r"--draws.*0", r"range 1<=x"),
    # seeds, like every other number, on every entry point that takes one
    *[(f"seed-negative-{e}", e, ["--seed", "-1"], r"--seed.*-1", SEED_FIX) for e in (B, M, L, H, S, W)],
    ("seed-too-large", B, ["--seed", str(2**32)], r"--seed.*4294967296", SEED_FIX),
    ("seed-not-a-number", S, ["--seed", "x"], r"--seed.*'x'", r"valid integer"),
    # strings that become paths: a run name is one folder name under the checkpoint folder
    *[(f"run-name-escapes-{e}", e, ["--run-name", "../../../../tmp/x"], r"--run-name '\.\./\.\./\.\./\.\./tmp/x' holds",
       ESCAPE_FIX) for e in (B, M, L, S)],
    ("run-name-dot-dot", M, ["--run-name", ".."], r"--run-name '\.\.' holds '\.\.'", ESCAPE_FIX),
    ("run-name-separator", S, ["--run-name", "a/b"], r"--run-name 'a/b' holds a path separator", ESCAPE_FIX),
    ("hpo-study-name-dot-dot", H, ["--study-name", ".."], r"--study-name '\.\.'", r"letters, digits"),
    # output folders that cannot be made or written: one line naming the option
    *[(f"checkpoint-dir-unwritable-{e}", e, ["--checkpoint-dir", "/proc/nope"], r"--checkpoint-dir /proc/nope: " + UNWRITABLE,
       WRITE_FIX) for e in (B, M, S)],
    ("checkpoint-dir-is-a-file", M, ["--checkpoint-dir", "{bad}/corrupt.pt"], r"--checkpoint-dir .*corrupt.pt: is a file",
     r"pass a folder"),
    ("results-dir-unwritable", W, ["--results-dir", "/proc/nope"], r"--results-dir /proc/nope: " + UNWRITABLE, WRITE_FIX),
    ("report-out-dir-unwritable", R, ["--out-dir", "/proc/nope"], r"--out-dir /proc/nope: " + UNWRITABLE, WRITE_FIX),
    ("main-data-dir-missing", W, ["--data-dir", "{tmp}/nowhere"], r"nowhere is not a directory", r"point it at"),
    ("hpo-sqlite-storage-unwritable", H, ["--n-trials", "0", "--encoder", "{bad}/moco-w4.pt", "--data-dir", "{data}",
                                          "--storage", "sqlite:////proc/nope/optuna.db"],
     r"--storage sqlite:////proc/nope/optuna.db: cannot open", r"that this machine can reach"),
    ("hpo-journal-storage-unwritable", H, ["--n-trials", "0", "--encoder", "{bad}/moco-w4.pt", "--data-dir", "{data}",
                                           "--storage", "journal:////proc/nope/optuna.log"],
     r"--storage journal:////proc/nope/optuna.log: cannot open", r"that this machine can reach"),
    ("bool-not-a-bool", L, ["--refit", "maybe"], r"--refit.*'maybe'", r"not a valid boolean"),
]  # fmt: skip


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, synthetic_data_dir: Path) -> Path:
    """Broken data folders and files, made once."""
    bad = tmp_path_factory.mktemp("bad_inputs")
    images, labels = synthetic_digits(40, seed=3)

    def variant(name: str, payload: bytes | None) -> None:
        shutil.copytree(synthetic_data_dir, bad / name)
        target = bad / name / "train-images-idx3-ubyte.gz"
        target.unlink()
        if payload is not None:
            target.write_bytes(payload)

    variant("missing", None)
    variant("truncated", gzip.compress(idx_bytes(images)[:-100]))
    variant("magic", gzip.compress(idx_bytes(labels)))
    variant("gzip", gzip.compress(idx_bytes(images))[:200])
    (bad / "readonly").mkdir()
    os.chmod(bad / "readonly", 0o555)
    (bad / "corrupt.pt").write_bytes(b"PK\x03\x04 this is not a torch archive")
    torch.save({"kind": "fewshot-classifier", "model": "cnn", "state_dict": {}}, bad / "foreign.pt")
    from tests.hpo_helpers import write_encoder_checkpoint

    write_encoder_checkpoint(bad / "encoder-w4.pt", width=4)
    state = torch.load(bad / "encoder-w4.pt", weights_only=True)
    from fewshot.pretrain import PretrainConfig

    cfg = PretrainConfig(width=4, batch_size=64, moco_k=128, bn_splits=4, epochs=1)
    state.update(moco_state={}, optimizer={}, epoch=0, step=0, config=cfg.params(), finished=False)
    torch.save(state, bad / "moco-w4.pt")
    return bad


@pytest.fixture
def restore_sigterm():
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def one_error_line(stderr: str, problem: str, fix: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    assert re.search(problem, lines[0]), f"problem /{problem}/ not named in: {lines[0]}"
    assert re.search(fix, lines[0]), f"fix /{fix}/ not named in: {lines[0]}"
    return lines[0]


@pytest.mark.parametrize(("entry", "args", "problem", "fix"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_problem_and_fix(
    entry, args, problem, fix, bad_inputs, synthetic_data_dir, tracking_store, tmp_path, monkeypatch, restore_sigterm
):
    fill = {"data": str(synthetic_data_dir), "bad": str(bad_inputs), "tmp": str(tmp_path)}
    args = [a.format(**fill) for a in args]
    monkeypatch.setenv("FEWSHOT_DATA_DIR", str(synthetic_data_dir))
    if "tracking store http" in problem:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    if "fewshot-moco-encoder@" in fix:
        MlflowClient(tracking_store).create_registered_model("fewshot-moco-encoder")
    command = importlib.import_module(f"entrypoints.{entry}").main
    result = CliRunner().invoke(command, args, catch_exceptions=True)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, (result.exit_code, result.output[-3000:])
    one_error_line(result.stderr, problem, fix)
    if "tracking store http" not in problem:
        assert not running(tracking_store), running(tracking_store)


# ---------------------------------------------------------------- real processes


class Evil:
    """Unpickling this runs ``touch <marker>``: weights-only loading must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _as_other_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture(scope="module")
def processes(tmp_path_factory, synthetic_data_dir: Path, bad_inputs: Path, _migrated_store_template: Path):
    """Start the subprocess cases together (two cores: they overlap their imports), then wait."""
    root = Path(tempfile.mkdtemp(prefix="fewshot-reliability-"))  # outside pytest's root-only folder
    os.chmod(root, 0o777)
    store_file = root / "mlflow.db"
    shutil.copy(_migrated_store_template, store_file)
    os.chmod(store_file, 0o666)
    store = f"sqlite:///{store_file}"
    unreadable = root / "unreadable"
    shutil.copytree(synthetic_data_dir, unreadable)
    os.chmod(unreadable, 0o755)
    os.chmod(unreadable / "t10k-labels-idx1-ubyte.gz", 0o000)
    locked = root / "locked"
    shutil.copytree(synthetic_data_dir, locked)
    os.chmod(locked, 0o700)  # root's: another user cannot list it
    (root / "mpl").mkdir(mode=0o777)
    os.chmod(root / "mpl", 0o777)
    evil = root / "evil.pt"
    evil.write_bytes(pickle.dumps({"format": "fewshot-moco-checkpoint", "payload": Evil(root / "pwned")}))
    data = str(synthetic_data_dir)
    cases = {
        "pickle-with-code": ([], [M, "--data-dir", data, *MOCO, "--resume", str(evil)], store),
        "unreadable-idx": (_as_other_user(), [B, "--data-dir", str(unreadable), "--epochs", "1"], store),
        "unreadable-data-dir": (_as_other_user(), [B, "--data-dir", str(locked), "--epochs", "1"], store),
        "tracking-password-redacted": ([], [B, "--data-dir", data, "--epochs", "1"],
                                       "http://alice:hunter2@127.0.0.1:9"),
        "debug-shows-traceback": ([], [M, "--data-dir", data, *MOCO, "--moco-k", "8", "--debug"], store),
    }  # fmt: skip
    procs = {}
    for name, (prefix, (entry, *args), uri) in cases.items():
        env = child_env(uri, HOME=str(root), MPLCONFIGDIR=str(root / "mpl"))
        procs[name] = subprocess.Popen(
            [*prefix, sys.executable, "-m", f"entrypoints.{entry}", *args], cwd=root, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    results = {name: (proc, *proc.communicate(timeout=300)) for name, proc in procs.items()}
    yield {"results": results, "store": store, "root": root}
    os.chmod(unreadable / "t10k-labels-idx1-ubyte.gz", 0o600)
    shutil.rmtree(root, ignore_errors=True)


def _done(processes, name: str) -> tuple[int, str, str]:
    proc, out, err = processes["results"][name]
    return proc.returncode, out, err


def test_nan_loss_from_a_huge_lr_stops_the_run_failed_with_one_line(synthetic_data_dir, tracking_store):
    """The command line caps --lr at 10, where no model here diverges; the library API takes
    any finite lr, and 1e30 makes the loss NaN on the first steps."""
    from fewshot.baseline import BaselineConfig, run_baseline
    from fewshot.errors import TrainingDiverged
    from fewshot.train import FitConfig

    cfg = BaselineConfig(model="mlp1", data_dir=str(synthetic_data_dir), run_name="nan",
                         fit=FitConfig(lr=1e30, epochs=3, progress=False))  # fmt: skip
    with pytest.raises(TrainingDiverged) as caught:
        run_baseline(cfg)
    one_error_line(f"error: {caught.value}", r"diverged.*loss (nan|inf)", r"lower --lr")
    (run,) = MlflowClient(tracking_store).search_runs(["1"], "attributes.run_name = 'nan'")
    assert run.info.status == "FAILED"


def test_a_pickle_carrying_code_is_refused_and_not_run(processes):
    code, _, err = _done(processes, "pickle-with-code")
    assert code == 2, err[-3000:]
    one_error_line(_errors_only(err), r"not a readable checkpoint", r"delete it or pass another")
    assert not (processes["root"] / "pwned").exists(), "unpickling ran code"


def test_an_unreadable_idx_file_is_one_line(processes):
    code, _, err = _done(processes, "unreadable-idx")
    assert code == 2, err[-3000:]
    one_error_line(_errors_only(err), r"t10k-labels-idx1-ubyte.gz", r"permission|readable")


def test_a_data_dir_the_user_cannot_list_is_one_line(processes):
    code, _, err = _done(processes, "unreadable-data-dir")
    assert code == 2, err[-3000:]
    one_error_line(_errors_only(err), r"--data-dir .*locked: permission denied", r"make it readable")


def test_an_unreachable_tracking_server_fails_fast_with_the_password_hidden(processes):
    code, out, err = _done(processes, "tracking-password-redacted")
    assert code == 2, err[-3000:]
    one_error_line(_errors_only(err), r"http://alice:\*\*\*@127.0.0.1:9 cannot be reached", r"tracking server")
    assert "hunter2" not in out + err


def test_debug_shows_the_traceback(processes):
    code, _, err = _done(processes, "debug-shows-traceback")
    assert code == 2 and "Traceback" in err and "error: --moco-k 8" in err, err[-3000:]


def _errors_only(stderr: str) -> str:
    """A real process may print library log lines (MLflow's INFO/WARNING) before the error; the
    user-facing output is the ``error:`` line and nothing resembling a traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return "\n".join(line for line in stderr.splitlines() if line.startswith("error:"))
