"""Launch tools against Nimbus's EC2 front door, unmodified: Ansible's
amazon.aws.ec2_instance launches and terminates an instance with no subnet
given (it finds the default VPC, subnet and group itself), boto3 drives the
VPC calls, and Apache libcloud's EC2 driver lists the nodes.

The fixtures `bed` and `ec2` (conftest.py) start `testbed`
(tests/src/bin/testbed.rs). Needs `pip install ansible apache-libcloud`
(scripts/test.sh should install them with boto3, awscli and pytest).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import botocore.exceptions
import pytest

PLAYBOOK = """
- hosts: localhost
  connection: local
  gather_facts: false
  module_defaults:
    group/amazon.aws.aws:
      aws_access_key: "{{ key }}"
      aws_secret_key: "{{ secret }}"
      region: nimbus-1
      endpoint_url: "{{ endpoint }}"
  tasks:
    - name: launch with no subnet
      amazon.aws.ec2_instance:
        name: ansible-web
        image_id: "{{ image }}"
        instance_type: t3.nano
        state: running
        wait: true
        wait_timeout: 120
        tags:
          role: web
      register: launched
    - name: what was launched
      ansible.builtin.copy:
        content: "{{ launched | to_json }}"
        dest: "{{ out }}/launched.json"
    - name: terminate it
      amazon.aws.ec2_instance:
        instance_ids: "{{ launched.instance_ids }}"
        state: absent
        wait: true
        wait_timeout: 120
      register: terminated
    - name: what was terminated
      ansible.builtin.copy:
        content: "{{ terminated | to_json }}"
        dest: "{{ out }}/terminated.json"
"""


def test_ansible_launches_and_terminates_with_no_subnet(bed, ec2):
    assert shutil.which("ansible-playbook"), "ansible-playbook is missing: pip install ansible (it brings amazon.aws)"
    with tempfile.TemporaryDirectory() as out:
        book = os.path.join(out, "play.yml")
        with open(book, "w") as f:
            f.write(PLAYBOOK)
        extra = {
            "key": bed["access_key_id"],
            "secret": bed["secret_access_key"],
            "endpoint": bed["endpoint"],
            "image": bed["image_id"],
            "out": out,
            "ansible_python_interpreter": sys.executable,
        }
        env = dict(os.environ, ANSIBLE_LOCALHOST_WARNING="False", ANSIBLE_INVENTORY_UNPARSED_WARNING="False", ANSIBLE_NOCOLOR="1")
        run = subprocess.run(
            ["ansible-playbook", "-i", "localhost,", book, "-e", json.dumps(extra)],
            capture_output=True, text=True, env=env, timeout=600,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        with open(os.path.join(out, "launched.json")) as f:
            launched = json.load(f)
        with open(os.path.join(out, "terminated.json")) as f:
            terminated = json.load(f)
    assert launched["changed"] and len(launched["instance_ids"]) == 1, launched
    instance = launched["instances"][0]
    default_vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    assert instance["vpc_id"] == default_vpc
    assert instance["private_ip_address"].startswith("172.31.")
    assert instance["tags"]["role"] == "web"
    assert terminated["changed"], terminated
    got = ec2.describe_instances(InstanceIds=launched["instance_ids"])["Reservations"][0]["Instances"][0]
    assert got["State"]["Name"] == "terminated"


def test_boto3_drives_the_vpc_calls(ec2):
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    zone = ec2.describe_availability_zones()["AvailabilityZones"][0]["ZoneName"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.20.1.0/28", AvailabilityZone=zone)["Subnet"]
    assert subnet["AvailableIpAddressCount"] == 11
    sg = ec2.create_security_group(GroupName="web", Description="web", VpcId=vpc)["GroupId"]
    ec2.authorize_security_group_ingress(
        GroupId=sg, IpPermissions=[{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    )
    with pytest.raises(botocore.exceptions.ClientError) as e:
        ec2.authorize_security_group_ingress(GroupId=sg, IpProtocol="tcp", FromPort=22, ToPort=22, CidrIp="0.0.0.0/0")
    assert e.value.response["Error"]["Code"] == "InvalidPermission.Duplicate"
    group = ec2.describe_security_groups(GroupIds=[sg])["SecurityGroups"][0]
    assert group["IpPermissions"][0]["IpRanges"] == [{"CidrIp": "0.0.0.0/0"}]
    r = ec2.run_instances(ImageId=ec2.describe_images()["Images"][0]["ImageId"], InstanceType="t3.nano", MinCount=1, MaxCount=1,
                          SubnetId=subnet["SubnetId"], SecurityGroupIds=[sg], PrivateIpAddress="10.20.1.7")
    inst = r["Instances"][0]
    assert (inst["PrivateIpAddress"], inst["SubnetId"], inst["VpcId"]) == ("10.20.1.7", subnet["SubnetId"], vpc)
    assert inst["SecurityGroups"] == [{"GroupId": sg, "GroupName": "web"}]
    eni = inst["NetworkInterfaces"][0]
    assert eni["Attachment"]["DeviceIndex"] == 0 and eni["MacAddress"].startswith("02:")
    found = ec2.describe_instances(Filters=[{"Name": "instance.group-id", "Values": [sg]}])["Reservations"]
    assert [i["InstanceId"] for res in found for i in res["Instances"]] == [inst["InstanceId"]]
    attr = ec2.describe_instance_attribute(InstanceId=inst["InstanceId"], Attribute="groupSet")
    assert attr["Groups"] == [{"GroupId": sg, "GroupName": "web"}]
    status = ec2.describe_instance_status(InstanceIds=[inst["InstanceId"]], IncludeAllInstances=True)["InstanceStatuses"]
    assert status[0]["InstanceId"] == inst["InstanceId"]
    enis = ec2.describe_network_interfaces(Filters=[{"Name": "subnet-id", "Values": [subnet["SubnetId"]]}])["NetworkInterfaces"]
    assert [n["PrivateIpAddress"] for n in enis] == ["10.20.1.7"]
    with pytest.raises(botocore.exceptions.ClientError) as e:
        ec2.delete_subnet(SubnetId=subnet["SubnetId"])
    assert e.value.response["Error"]["Code"] == "DependencyViolation"
    with pytest.raises(botocore.exceptions.ClientError) as e:
        ec2.allocate_address(Domain="vpc")
    assert e.value.response["Error"]["Code"] == "InsufficientAddressCapacity"


def test_libcloud_lists_nodes(bed, ec2):
    from urllib.parse import urlparse

    from libcloud.compute.providers import get_driver
    from libcloud.compute.types import Provider

    ec2.run_instances(ImageId=bed["image_id"], InstanceType="t3.nano", MinCount=1, MaxCount=1)
    url = urlparse(bed["endpoint"])
    cls = get_driver(Provider.EC2)
    driver = cls(bed["access_key_id"], bed["secret_access_key"], region="us-east-1", host=url.hostname, port=url.port, secure=False,
                 signature_version="4")
    # libcloud knows only AWS's region names: sign for Nimbus's (read at signing time).
    driver.region_name = bed["region"]
    nodes = driver.list_nodes()
    assert nodes, "libcloud sees the account's instances"
    assert all(n.id.startswith("i-") for n in nodes)
    assert any(n.private_ips and n.private_ips[0].startswith("172.31.") for n in nodes)
