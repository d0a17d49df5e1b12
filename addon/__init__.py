"""registry-cache: a Docker Hub pull-through mirror as a mitmproxy addon."""
