"""Test harness: a real upstream registry (CNCF distribution behind a counting,
fault-injecting front door, a Docker-Hub-style token server and a redirect CDN),
image builders, a registry v2 client and skopeo helpers.

Nothing here imports the mirror addon: the harness is the ground truth the
mirror is tested against.
"""
