"""A realistic session with the unmodified AWS SDK for Python (boto3) and the
AWS CLI against Nimbus's EC2 front door: botocore must parse every answer.

The fixture starts `testbed` (tests/src/bin/testbed.rs): a real control plane
on a fresh PostgreSQL database with one host agent on libvirt's test driver.
Run by scripts/test.sh, which builds testbed and sets DATABASE_URL.
"""

import json
import os
import queue
import subprocess
import sys
import threading
import time

import boto3
import botocore.exceptions
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = {"Delay": 1, "MaxAttempts": 60}
PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl nimbus@test"
# Start-up: a fresh database, migrations, an agent registering (seconds; generous for a loaded machine).
START_TIMEOUT = 120


class Bed:
    """The testbed process: its first line (the endpoint and credentials),
    then the agent's events, one JSON line each, read by a thread so that
    every wait has a timeout. Killed by close() if it does not end."""

    def __init__(self, exe):
        self.proc = subprocess.Popen([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def next_line(self, timeout):
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"testbed printed nothing within {timeout} s") from None
        if line is None:
            raise AssertionError(f"testbed exited (status {self.proc.wait()})")
        return json.loads(line)

    def wait_event(self, event, instance_id, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {event} of {instance_id} within {timeout} s")
            try:
                e = self.next_line(left)
            except AssertionError as why:
                raise AssertionError(f"no {event} of {instance_id} within {timeout} s: {why}") from None
            if e.get("event") == event and e.get("instance_id") == instance_id:
                return e

    def no_event_pending(self):
        """The events printed so far, none of them consumed."""
        return [json.loads(l) for l in list(self.lines.queue) if l is not None]

    def close(self):
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def testbed():
    exe = os.environ.get("NIMBUS_TESTBED", os.path.join(REPO, "target", "debug", "testbed"))
    tb = Bed(exe)
    try:
        tb.info = tb.next_line(START_TIMEOUT)
        yield tb
    finally:
        tb.close()


@pytest.fixture(scope="module")
def bed(testbed):
    """Overrides conftest's `bed`; conftest's `ec2` uses this one."""
    return testbed.info


def code_of(excinfo):
    return excinfo.value.response["Error"]["Code"]


def test_session(ec2, bed, testbed):
    image = bed["image_id"]
    # Discovery.
    zones = ec2.describe_availability_zones()["AvailabilityZones"]
    assert [z["ZoneName"] for z in zones] == ["nimbus-1a"]
    types = ec2.describe_instance_types(InstanceTypes=["t3.nano"])["InstanceTypes"]
    assert types[0]["VCpuInfo"]["DefaultVCpus"] == 2 and types[0]["MemoryInfo"]["SizeInMiB"] == 512
    assert ec2.describe_images(ImageIds=[image])["Images"][0]["ImageId"] == image

    # DryRun says yes without launching.
    with pytest.raises(botocore.exceptions.ClientError) as e:
        ec2.run_instances(ImageId=image, InstanceType="t3.nano", MinCount=1, MaxCount=1, DryRun=True)
    assert code_of(e) == "DryRunOperation"

    # Launch 3 with tags, user-data and a key pair; then 4 more.
    key = ec2.import_key_pair(KeyName="laptop", PublicKeyMaterial=PUBLIC_KEY.encode())
    assert key["KeyName"] == "laptop" and key["KeyFingerprint"].startswith("SHA256:")
    r = ec2.run_instances(
        ImageId=image,
        InstanceType="t3.nano",
        MinCount=3,
        MaxCount=3,
        KeyName="laptop",
        UserData="#!/bin/sh\necho hello\n",
        ClientToken="session-launch-1",
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": "web"}, {"Key": "env", "Value": "test"}]}],
    )
    ids = [i["InstanceId"] for i in r["Instances"]]
    assert len(ids) == 3 and all(i["State"]["Name"] == "pending" for i in r["Instances"])
    assert all(i["KeyName"] == "laptop" for i in r["Instances"])
    again = ec2.run_instances(
        ImageId=image, InstanceType="t3.nano", MinCount=3, MaxCount=3, KeyName="laptop",
        UserData="#!/bin/sh\necho hello\n", ClientToken="session-launch-1",
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": "web"}, {"Key": "env", "Value": "test"}]}],
    )
    assert again["ReservationId"] == r["ReservationId"], "same token, same reservation"
    more = ec2.run_instances(ImageId=image, InstanceType="t3.micro", MinCount=4, MaxCount=4)
    all_ids = ids + [i["InstanceId"] for i in more["Instances"]]

    # Paginate with the SDK's paginator: 7 instances in pages of 5.
    pages = list(ec2.get_paginator("describe_instances").paginate(PaginationConfig={"PageSize": 5}))
    seen = [i["InstanceId"] for p in pages for res in p["Reservations"] for i in res["Instances"]]
    assert len(pages) == 2 and sorted(seen) == sorted(all_ids)

    ec2.get_waiter("instance_running").wait(InstanceIds=ids, WaiterConfig=FAST)
    tagged = ec2.describe_instances(Filters=[{"Name": "tag:Name", "Values": ["web"]}, {"Name": "instance-state-name", "Values": ["running"]}])
    got = sorted(i["InstanceId"] for res in tagged["Reservations"] for i in res["Instances"])
    assert got == sorted(ids)
    inst = tagged["Reservations"][0]["Instances"][0]
    assert {t["Key"]: t["Value"] for t in inst["Tags"]} == {"Name": "web", "env": "test"}
    assert inst["State"] == {"Code": 16, "Name": "running"} and inst["LaunchTime"].year >= 2024

    # Tags.
    ec2.create_tags(Resources=[ids[0]], Tags=[{"Key": "role", "Value": "primary"}])
    t = ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [ids[0]]}])["Tags"]
    assert {x["Key"]: x["Value"] for x in t} == {"Name": "web", "env": "test", "role": "primary"}
    ec2.delete_tags(Resources=[ids[0]], Tags=[{"Key": "role"}])
    t = ec2.describe_tags(Filters=[{"Name": "key", "Values": ["role"]}])["Tags"]
    assert t == []

    # Stop and start.
    stopping = ec2.stop_instances(InstanceIds=[ids[0]])["StoppingInstances"][0]
    assert stopping["PreviousState"]["Name"] == "running" and stopping["CurrentState"]["Name"] == "stopping"
    ec2.get_waiter("instance_stopped").wait(InstanceIds=[ids[0]], WaiterConfig=FAST)
    starting = ec2.start_instances(InstanceIds=[ids[0]])["StartingInstances"][0]
    assert starting["PreviousState"]["Name"] == "stopped" and starting["CurrentState"]["Name"] == "pending"
    ec2.get_waiter("instance_running").wait(InstanceIds=[ids[0]], WaiterConfig=FAST)
    # Reboot: the agent reboots that guest, once, and it stays running.
    ec2.reboot_instances(InstanceIds=[ids[1]])
    testbed.wait_event("rebooted", ids[1])
    assert ec2.describe_instances(InstanceIds=[ids[1]])["Reservations"][0]["Instances"][0]["State"]["Name"] == "running"

    # Console output: what the guest wrote to its serial console (the test
    # driver writes none: a file where the guest's log would be), which
    # botocore receives base64 and decodes.
    out = ec2.get_console_output(InstanceId=ids[1])
    assert out["InstanceId"] == ids[1] and not out.get("Output"), out
    console = "NIMBUS-BOOT instance-id=%s\r\nnimbus-init: h\u00e9llo\r\nNIMBUS-READY\r\n" % ids[1]
    with open(os.path.join(bed["state_dir"], "instances", ids[1], "console.log"), "w", encoding="utf-8") as f:
        f.write(console)
    deadline = time.monotonic() + 30
    while not out.get("Output") and time.monotonic() < deadline:
        time.sleep(0.2)
        out = ec2.get_console_output(InstanceId=ids[1])
    assert out.get("Output") == console, out
    assert testbed.no_event_pending() == [], "rebooted once"

    # Key pairs.
    created = ec2.create_key_pair(KeyName="generated")
    assert created["KeyMaterial"].startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    names = sorted(k["KeyName"] for k in ec2.describe_key_pairs()["KeyPairs"])
    assert names == ["generated", "laptop"]
    ec2.delete_key_pair(KeyName="generated")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        ec2.describe_key_pairs(KeyNames=["generated"])
    assert code_of(e) == "InvalidKeyPair.NotFound"

    # Errors botocore must parse.
    with pytest.raises(botocore.exceptions.ClientError) as e:
        ec2.describe_instances(InstanceIds=["i-0123456789abcdef0"])
    assert code_of(e) == "InvalidInstanceID.NotFound"
    # Starting a running instance changes nothing (as in EC2).
    noop = ec2.start_instances(InstanceIds=[ids[2]])["StartingInstances"][0]
    assert noop["PreviousState"]["Name"] == noop["CurrentState"]["Name"] == "running"
    with pytest.raises(botocore.exceptions.ClientError) as e:
        ec2.run_instances(ImageId="ami-00000000000000000", InstanceType="t3.nano", MinCount=1, MaxCount=1)
    assert code_of(e) == "InvalidAMIID.NotFound"

    # Terminate everything and wait.
    term = ec2.terminate_instances(InstanceIds=all_ids)["TerminatingInstances"]
    assert {t["CurrentState"]["Name"] for t in term} == {"shutting-down"}
    ec2.get_waiter("instance_terminated").wait(InstanceIds=all_ids, WaiterConfig=FAST)


def test_aws_cli(bed):
    env = dict(os.environ, AWS_ACCESS_KEY_ID=bed["access_key_id"], AWS_SECRET_ACCESS_KEY=bed["secret_access_key"],
               AWS_DEFAULT_REGION=bed["region"], AWS_PAGER="")
    # The AWS CLI as installed from PyPI, run by this interpreter (no PATH shims needed).
    base = [sys.executable, "-m", "awscli", "ec2", "--endpoint-url", bed["endpoint"], "--output", "json"]
    run = subprocess.run(base + ["run-instances", "--image-id", bed["image_id"], "--instance-type", "t3.nano", "--count", "1"],
                         env=env, capture_output=True, text=True, check=True)
    iid = json.loads(run.stdout)["Instances"][0]["InstanceId"]
    subprocess.run(base + ["wait", "instance-running", "--instance-ids", iid], env=env, check=True, timeout=120)
    desc = subprocess.run(base + ["describe-instances", "--instance-ids", iid], env=env, capture_output=True, text=True, check=True)
    assert json.loads(desc.stdout)["Reservations"][0]["Instances"][0]["State"]["Name"] == "running"
    subprocess.run(base + ["terminate-instances", "--instance-ids", iid], env=env, capture_output=True, check=True)
    subprocess.run(base + ["wait", "instance-terminated", "--instance-ids", iid], env=env, check=True, timeout=120)
    bad = subprocess.run(base + ["describe-instances", "--instance-ids", "i-nope"], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "InvalidInstanceID.Malformed" in bad.stderr
