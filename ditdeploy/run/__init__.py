"""A deployed model making images: the deployment handle, the sampling entry point, shards."""
