"""Training: classifiers on global descriptors, Keras fine-tuning, detector training.

Nothing here yet: the foundation's only method (HoG + kNN) has no learned parameters. The classic-baselines,
deep-embeddings, DELF and detection issues add their trainers here.
"""
