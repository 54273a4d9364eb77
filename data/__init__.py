"""Data loaders: the embedded cluttered-MNIST default and ImageNet."""
