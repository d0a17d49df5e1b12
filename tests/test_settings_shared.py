"""The shared tier's and the cluster's options, as Settings.read checks them."""

from __future__ import annotations

import pytest
from mitmproxy import options

from addon import settings
from addon.cluster import Member
from addon.settings import Settings


class _Loader:
    def __init__(self, opts):
        self.opts = opts

    def add_option(self, name, typespec, default, help):  # noqa: A002 - mitmproxy's signature
        self.opts.add_option(name, typespec, default, help)


def read(**values) -> Settings:
    opts = options.Options()
    settings.declare(_Loader(opts))
    opts.update(mode=["reverse:http://127.0.0.1:5000@127.0.0.1:5999"], **values)
    return Settings.read(opts)


def test_nothing_set_means_no_shared_tier_and_no_cluster():
    s = read()
    assert s.s3 is None and s.cluster is None


def test_the_shared_tier():
    s = read(s3_bucket="mirror", s3_endpoint="http://minio.lan:9000/", s3_prefix="office", s3_region="eu-west-1")
    assert (s.s3.bucket, s.s3.endpoint, s.s3.prefix, s.s3.region) == \
        ("mirror", "http://minio.lan:9000", "office/", "eu-west-1")
    assert (s.s3.timeout, s.s3.retry_after, s.s3.connections) == (5, 30, 1)
    assert read(s3_bucket="mirror").s3.endpoint == ""  # AWS S3


def test_a_static_cluster(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    s = read(cluster_members="10.0.0.2:5001, 10.0.0.1:5001", cluster_secret_file=str(secret), blob_port="5001")
    assert s.cluster.members == (Member("10.0.0.1", 5001), Member("10.0.0.2", 5001))
    assert s.cluster.address is None and s.cluster.dns_name == ""
    s = read(cluster_members="127.0.0.1:5001,127.0.0.1:5002", cluster_secret_file=str(secret), blob_port="5002",
             cluster_address="127.0.0.1:5002")
    assert s.cluster.address == Member("127.0.0.1", 5002)


def test_a_cluster_from_dns(tmp_path):
    s = read(cluster_members="dns:mirror.registry.svc.cluster.local:5001", cluster_secret_file="/x",
             blob_port="5001")
    assert (s.cluster.dns_name, s.cluster.dns_port, s.cluster.members) == \
        ("mirror.registry.svc.cluster.local", 5001, ())


@pytest.mark.parametrize("values, message", [
    ({"s3_endpoint": "http://minio:9000"}, "s3_bucket is not"),
    ({"s3_bucket": "b", "s3_endpoint": "minio:9000"}, "http:// or https://"),
    ({"s3_bucket": "b", "s3_timeout": 0}, "s3_timeout"),
    ({"cluster_members": "10.0.0.1:5001", "blob_port": "5001"}, "needs cluster_secret_file"),
    ({"cluster_members": "10.0.0.1:5001", "cluster_secret_file": "/x"}, "needs a fixed blob_port"),
    ({"cluster_members": "10.0.0.1", "cluster_secret_file": "/x", "blob_port": "5001"}, "has no port"),
    ({"cluster_members": "dns:mirror", "cluster_secret_file": "/x", "blob_port": "5001"}, "dns:NAME:PORT"),
    ({"cluster_members": "10.0.0.1:5001", "cluster_secret_file": "/x", "blob_port": "5001",
      "cluster_address": "10.0.0.9:5001"}, "not among cluster_members"),
    ({"blob_url": "mirror.lan:5001"}, "blob_url must be"),
    ({"blob_url": "http://mirror.lan:99999"}, "blob_url: not a valid port"),
    ({"mirror_url": "http://mirror.lan:5000/?x=1"}, "mirror_url must be"),
    ({"mirror_url": "http://user@mirror.lan:5000"}, "mirror_url must be"),
    ({"mirror_url": "ftp://mirror.lan"}, "mirror_url must be"),
    ({"mirror_url": "http://m.lan?"}, "mirror_url must be"),
    ({"blob_url": "http://m.lan#"}, "blob_url must be"),
    ({"mirror_url": "http://mirror lan:5000"}, "mirror_url must be"),
    ({"mirror_url": "http://m.lan:5000/a b"}, "mirror_url must be"),
    ({"blob_url": "http://mirror.lan:0"}, "blob_url must be"),
])
def test_unusable_values_are_refused_with_a_message(values, message):
    with pytest.raises(ValueError, match=message):
        read(**values)


def test_the_urls_clients_are_handed():
    s = read()
    assert (s.blob_url, s.mirror_url) == ("", "")  # the address each client connected to
    s = read(blob_url="http://mirror.lan:5001/", mirror_url="https://mirror.example.com/registry/")
    assert (s.blob_url, s.mirror_url) == ("http://mirror.lan:5001", "https://mirror.example.com/registry")
