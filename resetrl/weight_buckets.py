"""Moved to resetrl/weights/buckets.py; this name stays until actors/engines/hf_engine.py and bench/weight_sync.py
import from there, then goes."""

from resetrl.weights.buckets import (  # noqa: F401
    ALIGN_BYTES, SOURCE_RANK, TensorSpec, broadcast_bucket, bucket_nbytes, dtype_from_name, dtype_name, open_group,
    open_store, pack_bucket, plan_buckets, receive_buckets, unpack_bucket,
)
