"""Training stack: the language model (`train.model`), decoding (`train.decode`), and the training loop."""
