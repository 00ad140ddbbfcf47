"""Producers: methods that turn a labelled dataset into a bundle."""
