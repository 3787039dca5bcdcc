"""Named pipelines.  The default one turns a traced model into fused, cache-aware IR."""

DEFAULT_PIPELINE = ("canonicalize,fold-constants,cse,dce,fuse-rms-norm,fuse-layer-norm,fuse-rope,"
                    "fuse-attention,fuse-swiglu,fuse-gelu-mlp,dce,kv-cache")
