"""Training: classifiers on global descriptors, Keras fine-tuning, detector training.

``models.classifiers`` holds the calibrated linear classifiers that scale to ~13,000 landmark classes and a
million training images: :class:`~models.classifiers.NearestClassMean` (one pass over the data) and
:class:`~models.classifiers.SoftmaxClassifier` (multinomial logistic regression, mini-batch Adam in numpy),
both with temperature-scaled probabilities and a batch-wise ``predict_top``. kNN voting over the FAISS index
(``index.recognize``) is the training-free alternative. The deep-embeddings, DELF and detection issues add
their trainers here.
"""
