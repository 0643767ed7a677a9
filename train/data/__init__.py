"""The Grain data pipeline: sources -> mixture -> decode -> pack -> batch -> device.

  config.py    DataConfig / SourceConfig (frozen dataclasses, loaded from YAML)
  records.py   the record format shared by manifests, ArrayRecord and TFDS (media inline or by path)
  sources.py   random-access sources: JSONL manifest, ArrayRecord files, prepared TFDS datasets
  decode.py    record -> tokenised example (or a bad-sample marker with file and reason)
  mixture.py   seeded shuffle, epochs, weighted mixing and per-process sharding (grain MapDataset)
  packing.py   two-budget (text tokens, vision patches) packing of whole examples into fixed rows
  pipeline.py  make_iterator: the resumable iterator of packed batches, optionally as global jax.Arrays
  demo.py      the synthetic, learnable demo dataset
  tfds_export.py  records -> a prepared TFDS dataset (array_record), written without TensorFlow
  check.py     decode every sample of a source and count the bad ones
"""
