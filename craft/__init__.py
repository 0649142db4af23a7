"""CRAFT: closed-loop reinforcement fine-tuning of candidate-scoring driving policies."""

__version__ = "0.1.0"
