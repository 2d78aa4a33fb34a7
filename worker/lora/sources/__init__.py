"""Where adapter and model weights come from: `file://`, `pvc://`, `s3://` and `hf://` sources behind one interface.

`SourceResolver.fetch(uri)` turns any source URI into a verified local directory. Remote sources (S3 through boto3,
the Hugging Face hub through huggingface_hub) are downloaded into a bounded cache (`cache.py`) keyed by the
source's version, into a temporary directory that is verified (`verify.py`: safetensors only, sizes, checksums and
tensor shapes) and then renamed into place, so nothing half-written is ever loaded.
"""
