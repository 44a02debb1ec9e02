"""Datasets that feed the shared encoder: volume folders, labelled pairs, MedMNIST, MedSegBench."""
