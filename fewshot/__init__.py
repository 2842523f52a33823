"""fewshot: how good can a digit classifier get when only 100 MNIST images carry labels?"""

__version__ = "0.1.0"
