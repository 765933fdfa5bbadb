"""Engine adapters, one subpackage each: ``vllm`` (KV connector), ``hf`` (transformers cache and
attention). Facades over ``kvd.client``; they never import the store, tiers or the daemon."""
