"""FAISS indices over global descriptors, batched search, and recognition from neighbours."""
