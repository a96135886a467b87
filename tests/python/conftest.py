"""Fixtures shared by the tests of this folder: `bed`, a running testbed
(tests/src/bin/testbed.rs: a control plane on a fresh database, one host
agent on libvirt's test driver, an image and an account), and `ec2`, a boto3
client of its account. A test module may define its own of the same name."""

import json
import os
import subprocess

import boto3
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def bed():
    exe = os.environ.get("NIMBUS_TESTBED", os.path.join(REPO, "target", "debug", "testbed"))
    proc = subprocess.Popen([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line, "testbed did not start"
    yield json.loads(line)
    proc.stdin.close()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def ec2(bed):
    return boto3.client(
        "ec2",
        endpoint_url=bed["endpoint"],
        region_name=bed["region"],
        aws_access_key_id=bed["access_key_id"],
        aws_secret_access_key=bed["secret_access_key"],
    )
