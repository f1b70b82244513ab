"""Stage bodies: each stage of a run as a plain function with explicit parameters, most of them Beam jobs.

    extract.py      manifest -> descriptors (Beam; RunInference for the CNN, DELF and detector stages)
    encode.py       local/global features -> BoVW, VLAD or PCA-whitened vectors (Beam), descriptor sampling
    train.py        the trainers: vocabularies and encoders, PCA, classifiers, fine-tuning, DELF, the detector
    index.py        the FAISS index or inverted file over the database (index_build.py: the adds on workers)
    recognize.py    search, re-rank and decide the queries' landmarks (search.py: the same as a Beam job)
    neighbours.py   the k nearest database images of the queries
    synth.py        the synthetic landmark set
Each returns its record with a ``cost`` (costs.py). The Beam jobs share one setup (beamjob.py) and take a
``test_pipeline``; their DoFns and model handlers are in transforms.py, inference.py and encoding.py, and
the writer of feature shards where they are made in shards.py.
Stages import index/, models/, reports/, features/ and pipeline's data contracts; never the orchestration above
them (pipeline/run/) or the command (jobs/).
"""
