"""fewshot: how good can a digit classifier get when only 100 MNIST images carry labels?"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy public helpers, so that ``import fewshot`` stays light (no torch, no mlflow)."""
    if name == "load_encoder":
        from fewshot.encoder_source import load_encoder  # here, not at the top: `import fewshot` stays light

        return load_encoder
    raise AttributeError(f"module 'fewshot' has no attribute {name!r}")
