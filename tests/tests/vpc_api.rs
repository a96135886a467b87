//! VPC networking through the EC2 front door (and REST where it differs):
//! the default VPC, VPCs, subnets, security groups and rules, launches into
//! subnets with their addresses, Elastic IPs, interfaces, the instance
//! attribute and status calls, and each host's HostNetwork as the agent
//! protocol answers it. Every error is checked by its EC2 code, and that
//! nothing was half-created.

use nimbus_tests::{xml_error_code as code, xml_values as values, Cloud, CloudOptions, Ec2Keys};
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

async fn ec2(cloud: &Cloud, keys: &Ec2Keys, form: &str) -> String {
    let (status, xml) = cloud.ec2(keys, form).await.unwrap();
    assert_eq!(status, 200, "{form}: {xml}");
    xml
}

/// Asserts the call fails with `expected` (and a 4xx, or 500 for capacity).
async fn ec2_err(cloud: &Cloud, keys: &Ec2Keys, form: &str, expected: &str) {
    let (status, xml) = cloud.ec2(keys, form).await.unwrap();
    assert_eq!(code(&xml), expected, "{form}: {xml}");
    let server = expected.starts_with("Insufficient") && expected != "InsufficientFreeAddressesInSubnet";
    assert_eq!(status, if server { 500 } else { 400 }, "{form}: {xml}");
}

async fn count(cloud: &Cloud, table: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(&format!("SELECT count(*) FROM {table}")).fetch_one(cloud.db()).await.unwrap();
    n
}

/// Row counts of every network table, to show that a refused call wrote nothing.
async fn network_rows(cloud: &Cloud) -> Vec<i64> {
    let mut out = Vec::new();
    for t in [
        "vpcs",
        "subnets",
        "security_groups",
        "security_group_rules",
        "network_interfaces",
        "network_interface_groups",
        "public_addresses",
        "instances",
        "reservations",
    ] {
        out.push(count(cloud, t).await);
    }
    out
}

fn first(xml: &str, tag: &str) -> String {
    values(xml, tag).first().map(|s| s.to_string()).unwrap_or_else(|| panic!("no <{tag}> in {xml}"))
}

async fn default_vpc(cloud: &Cloud, keys: &Ec2Keys) -> String {
    first(&ec2(cloud, keys, "Action=DescribeVpcs&Filter.1.Name=isDefault&Filter.1.Value.1=true").await, "vpcId")
}

async fn launch(cloud: &Cloud, keys: &Ec2Keys, extra: &str) -> Vec<String> {
    let xml =
        ec2(cloud, keys, &format!("Action=RunInstances&ImageId={}&InstanceType=t3.nano&MinCount=1&MaxCount=1{extra}", image(cloud).await))
            .await;
    values(&xml, "instanceId").into_iter().map(str::to_string).collect()
}

/// Waits until the account's instance is in `state` (its host confirmed it).
async fn wait_state(cloud: &Cloud, keys: &Ec2Keys, id: &str, state: &str) {
    let token = format!("{}:{}", keys.akid, keys.secret);
    cloud
        .wait_until(T, || async {
            let (_, v) = cloud.call_as(Some(&token), Method::GET, &format!("/v1/instances/{id}"), None).await?;
            Ok(v["state"]["name"] == state)
        })
        .await
        .unwrap_or_else(|e| panic!("{id} did not reach {state}: {e}"));
}

async fn image(cloud: &Cloud) -> String {
    let (id,): (String,) = sqlx::query_as("SELECT id FROM images WHERE is_default").fetch_one(cloud.db()).await.unwrap();
    id
}

#[tokio::test(flavor = "multi_thread")]
async fn the_default_vpc_has_a_subnet_per_zone_and_a_default_group_created_once() {
    let cloud = Cloud::start().await.unwrap();
    let _a = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    let _b = cloud.add_agent("b", "az2", 8, 8192, 100).await.unwrap();
    let alice = cloud.ec2_account("alice").await.unwrap();

    // Many first calls at once: one default VPC, one group, one subnet per zone.
    let calls = (0..8).map(|_| cloud.ec2(&alice, "Action=DescribeVpcs"));
    for r in futures::future::join_all(calls).await {
        assert_eq!(r.unwrap().0, 200);
    }
    let (vpcs, groups, subnets): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM vpcs WHERE account_id = $1), (SELECT count(*) FROM security_groups WHERE account_id = $1), \
                (SELECT count(*) FROM subnets WHERE account_id = $1)",
    )
    .bind(&alice.account_id)
    .fetch_one(cloud.db())
    .await
    .unwrap();
    assert_eq!((vpcs, groups, subnets), (1, 1, 2));

    let xml = ec2(&cloud, &alice, "Action=DescribeVpcs&Filter.1.Name=isDefault&Filter.1.Value.1=true").await;
    assert_eq!(values(&xml, "cidrBlock")[0], "172.31.0.0/16");
    assert_eq!(values(&xml, "isDefault"), vec!["true"]);
    let vpc = first(&xml, "vpcId");
    let xml = ec2(&cloud, &alice, "Action=DescribeAccountAttributes&AttributeName.1=default-vpc").await;
    assert_eq!(values(&xml, "attributeValue"), vec![vpc.as_str()]);

    // What Ansible asks: the default subnet of a zone.
    let xml = ec2(
        &cloud,
        &alice,
        &format!("Action=DescribeSubnets&Filter.1.Name=vpc-id&Filter.1.Value.1={vpc}&Filter.2.Name=default-for-az&Filter.2.Value.1=true&Filter.3.Name=availability-zone&Filter.3.Value.1=az2&Filter.4.Name=state&Filter.4.Value.1=available"),
    )
    .await;
    assert_eq!(values(&xml, "availabilityZone"), vec!["az2"]);
    assert_eq!(values(&xml, "cidrBlock"), vec!["172.31.16.0/20"]);
    assert_eq!(values(&xml, "availableIpAddressCount"), vec!["4091"]);
    assert_eq!(values(&xml, "mapPublicIpOnLaunch"), vec!["false"], "no public pool: no public addresses on launch");

    // The default group: inbound from itself, all outbound.
    let xml = ec2(&cloud, &alice, "Action=DescribeSecurityGroups&GroupName.1=default").await;
    let sg = first(&xml, "groupId");
    assert_eq!(values(&xml, "ipProtocol"), vec!["-1", "-1"]);
    assert!(xml.contains(&format!("<groups><item><userId>{}</userId><groupId>{sg}</groupId></item></groups>", alice.account_id)), "{xml}");
    assert!(xml.contains("<ipRanges><item><cidrIp>0.0.0.0/0</cidrIp></item></ipRanges>"), "{xml}");
    ec2_err(&cloud, &alice, &format!("Action=DeleteSecurityGroup&GroupId={sg}"), "CannotDelete").await;

    // A zone that appears later gets its default subnet when next needed.
    let _c = cloud.add_agent("c", "az3", 8, 8192, 100).await.unwrap();
    let xml = ec2(&cloud, &alice, "Action=DescribeSubnets&Filter.1.Name=defaultForAz&Filter.1.Value.1=true").await;
    let mut zones = values(&xml, "availabilityZone");
    zones.sort();
    assert_eq!(zones, vec!["az1", "az2", "az3"]);
    assert!(values(&xml, "cidrBlock").contains(&"172.31.32.0/20"), "{xml}");

    // Another account has its own default VPC, with its own VNI.
    let bob = cloud.ec2_account("bob").await.unwrap();
    let bob_vpc = default_vpc(&cloud, &bob).await;
    assert_ne!(bob_vpc, vpc);
    let (distinct,): (i64,) = sqlx::query_as("SELECT count(DISTINCT vni) FROM vpcs").fetch_one(cloud.db()).await.unwrap();
    assert_eq!(distinct, 2);
    ec2_err(&cloud, &bob, &format!("Action=DescribeVpcs&VpcId.1={vpc}"), "InvalidVpcID.NotFound").await;
    ec2_err(&cloud, &bob, &format!("Action=DescribeSecurityGroups&GroupId.1={sg}"), "InvalidGroup.NotFound").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn vpcs_and_subnets_refuse_bad_input_with_ec2_codes_and_create_nothing() {
    let cloud = Cloud::start().await.unwrap();
    let _a = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let alice = cloud.ec2_account("alice").await.unwrap();
    let bob = cloud.ec2_account("bob").await.unwrap();
    let xml = ec2(&cloud, &alice, "Action=CreateVpc&CidrBlock=10.0.0.0/16").await;
    let vpc = first(&xml, "vpcId");
    assert_eq!(values(&xml, "isDefault"), vec!["false"]);
    let xml = ec2(&cloud, &alice, &format!("Action=CreateSubnet&VpcId={vpc}&CidrBlock=10.0.1.0/24&AvailabilityZone=az1")).await;
    let subnet = first(&xml, "subnetId");
    assert_eq!(values(&xml, "availableIpAddressCount"), vec!["251"]);
    // A non-default VPC gets a default group too.
    let xml = ec2(&cloud, &alice, &format!("Action=DescribeSecurityGroups&Filter.1.Name=vpc-id&Filter.1.Value.1={vpc}")).await;
    assert_eq!(values(&xml, "groupName"), vec!["default"]);
    // Bob's default network exists before we count (it is made on first use).
    default_vpc(&cloud, &bob).await;
    let before = network_rows(&cloud).await;

    let cases: Vec<(String, &Ec2Keys, &str)> = vec![
        ("Action=CreateVpc&CidrBlock=10.0.0.0/8".into(), &alice, "InvalidVpc.Range"),
        ("Action=CreateVpc&CidrBlock=10.0.0.0/29".into(), &alice, "InvalidVpc.Range"),
        ("Action=CreateVpc&CidrBlock=10.0.0.1/16".into(), &alice, "InvalidParameterValue"),
        ("Action=CreateVpc&CidrBlock=banana".into(), &alice, "InvalidParameterValue"),
        ("Action=CreateVpc".into(), &alice, "MissingParameter"),
        (format!("Action=CreateSubnet&VpcId={vpc}&CidrBlock=10.1.0.0/24"), &alice, "InvalidSubnet.Range"),
        (format!("Action=CreateSubnet&VpcId={vpc}&CidrBlock=10.0.0.0/30"), &alice, "InvalidSubnet.Range"),
        (format!("Action=CreateSubnet&VpcId={vpc}&CidrBlock=10.0.1.128/25"), &alice, "InvalidSubnet.Conflict"),
        (format!("Action=CreateSubnet&VpcId={vpc}&CidrBlock=10.0.0.0/16"), &alice, "InvalidSubnet.Conflict"),
        (format!("Action=CreateSubnet&VpcId={vpc}&CidrBlock=10.0.2.0/24&AvailabilityZone=az9"), &alice, "InvalidParameterValue"),
        (format!("Action=CreateSubnet&VpcId={vpc}&CidrBlock=10.0.2.0/24"), &bob, "InvalidVpcID.NotFound"),
        ("Action=CreateSubnet&VpcId=vpc-0123456789abcdef0&CidrBlock=10.0.2.0/24".into(), &alice, "InvalidVpcID.NotFound"),
        ("Action=CreateSubnet&VpcId=vpc-nope&CidrBlock=10.0.2.0/24".into(), &alice, "InvalidVpcID.Malformed"),
        (format!("Action=DeleteVpc&VpcId={vpc}"), &alice, "DependencyViolation"),
        (format!("Action=DeleteVpc&VpcId={vpc}"), &bob, "InvalidVpcID.NotFound"),
        (format!("Action=DeleteSubnet&SubnetId={subnet}"), &bob, "InvalidSubnetID.NotFound"),
        ("Action=DeleteSubnet&SubnetId=subnet-0123456789abcdef0".into(), &alice, "InvalidSubnetID.NotFound"),
        (format!("Action=DescribeSubnets&SubnetId.1={subnet}"), &bob, "InvalidSubnetID.NotFound"),
        ("Action=DescribeSubnets&Filter.1.Name=bogus&Filter.1.Value.1=x".into(), &alice, "InvalidParameterValue"),
        (format!("Action=ModifySubnetAttribute&SubnetId={subnet}&MapPublicIpOnLaunch.Value=true"), &bob, "InvalidSubnetID.NotFound"),
        (
            format!("Action=RunInstances&ImageId={}&InstanceType=t3.nano&MinCount=1&MaxCount=1&SubnetId={subnet}", image(&cloud).await),
            &bob,
            "InvalidSubnetID.NotFound",
        ),
    ];
    for (form, who, expected) in &cases {
        ec2_err(&cloud, who, form, expected).await;
    }
    assert_eq!(network_rows(&cloud).await[..4], before[..4], "nothing half-created");

    // At most five VPCs an account, the default one included.
    for i in 0..3 {
        ec2(&cloud, &alice, &format!("Action=CreateVpc&CidrBlock=10.{}.0.0/16", i + 1)).await;
    }
    ec2_err(&cloud, &alice, "Action=CreateVpc&CidrBlock=10.9.0.0/16", "VpcLimitExceeded").await;

    // A subnet with an instance cannot go; without, it can, and then its VPC.
    let ids = launch(&cloud, &alice, &format!("&SubnetId={subnet}")).await;
    ec2_err(&cloud, &alice, &format!("Action=DeleteSubnet&SubnetId={subnet}"), "DependencyViolation").await;
    ec2(&cloud, &alice, &format!("Action=TerminateInstances&InstanceId.1={}", ids[0])).await;
    let inst = ids[0].clone();
    cloud
        .wait_until(T, || async {
            let (n,): (i64,) =
                sqlx::query_as("SELECT count(*) FROM network_interfaces WHERE instance_id = $1").bind(&inst).fetch_one(cloud.db()).await?;
            Ok(n == 0)
        })
        .await
        .unwrap();
    ec2(&cloud, &alice, &format!("Action=DeleteSubnet&SubnetId={subnet}")).await;
    ec2(&cloud, &alice, &format!("Action=DeleteVpc&VpcId={vpc}")).await;
    ec2_err(&cloud, &alice, &format!("Action=DescribeVpcs&VpcId.1={vpc}"), "InvalidVpcID.NotFound").await;
    let dvpc = default_vpc(&cloud, &alice).await;
    ec2_err(&cloud, &alice, &format!("Action=DeleteVpc&VpcId={dvpc}"), "OperationNotPermitted").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn security_groups_and_rules_all_or_nothing() {
    let cloud = Cloud::start().await.unwrap();
    let _a = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let alice = cloud.ec2_account("alice").await.unwrap();
    let bob = cloud.ec2_account("bob").await.unwrap();
    let web = first(&ec2(&cloud, &alice, "Action=CreateSecurityGroup&GroupName=web&GroupDescription=web+servers").await, "groupId");
    let db = first(&ec2(&cloud, &alice, "Action=CreateSecurityGroup&GroupName=db&GroupDescription=databases").await, "groupId");
    // A new group: no inbound, all outbound.
    let xml = ec2(&cloud, &alice, &format!("Action=DescribeSecurityGroups&GroupId.1={web}")).await;
    assert!(xml.contains("<ipPermissions/>"), "{xml}");
    assert!(
        xml.contains(
            "<ipPermissionsEgress><item><ipProtocol>-1</ipProtocol><groups/><ipRanges><item><cidrIp>0.0.0.0/0</cidrIp></item></ipRanges>"
        ),
        "{xml}"
    );

    // Both forms of a rule; a group reference stays a reference.
    let xml = ec2(&cloud, &alice, &format!("Action=AuthorizeSecurityGroupIngress&GroupId={web}&IpPermissions.1.IpProtocol=tcp&IpPermissions.1.FromPort=443&IpPermissions.1.ToPort=443&IpPermissions.1.IpRanges.1.CidrIp=0.0.0.0/0&IpPermissions.1.IpRanges.2.CidrIp=10.0.0.0/8")).await;
    assert_eq!(values(&xml, "securityGroupRuleId").len(), 2);
    ec2(&cloud, &alice, "Action=AuthorizeSecurityGroupIngress&GroupName=web&IpProtocol=tcp&FromPort=22&ToPort=22&CidrIp=192.0.2.0/24")
        .await;
    ec2(&cloud, &alice, &format!("Action=AuthorizeSecurityGroupIngress&GroupId={db}&IpPermissions.1.IpProtocol=tcp&IpPermissions.1.FromPort=5432&IpPermissions.1.ToPort=5432&IpPermissions.1.UserIdGroupPairs.1.GroupId={web}")).await;
    let xml = ec2(&cloud, &alice, &format!("Action=DescribeSecurityGroupRules&Filter.1.Name=group-id&Filter.1.Value.1={db}")).await;
    assert!(xml.contains(&format!("<referencedGroupInfo><groupId>{web}</groupId>")), "{xml}");
    assert_eq!(values(&xml, "isEgress"), vec!["false", "true"]);

    let before = network_rows(&cloud).await;
    let cases: Vec<(String, &Ec2Keys, &str)> = vec![
        // One new rule and one that exists: neither is added.
        (format!("Action=AuthorizeSecurityGroupIngress&GroupId={web}&IpPermissions.1.IpProtocol=udp&IpPermissions.1.FromPort=53&IpPermissions.1.ToPort=53&IpPermissions.1.IpRanges.1.CidrIp=0.0.0.0/0&IpPermissions.2.IpProtocol=tcp&IpPermissions.2.FromPort=443&IpPermissions.2.ToPort=443&IpPermissions.2.IpRanges.1.CidrIp=0.0.0.0/0"), &alice, "InvalidPermission.Duplicate"),
        (format!("Action=AuthorizeSecurityGroupIngress&GroupId={web}&IpProtocol=udp&FromPort=53&ToPort=53&CidrIp=0.0.0.0/0&IpPermissions.1.IpProtocol=udp&IpPermissions.1.FromPort=53&IpPermissions.1.ToPort=53&IpPermissions.1.IpRanges.1.CidrIp=0.0.0.0/0"), &alice, "InvalidPermission.Duplicate"),
        (format!("Action=RevokeSecurityGroupIngress&GroupId={web}&IpProtocol=tcp&FromPort=443&ToPort=443&CidrIp=0.0.0.0/0&IpPermissions.1.IpProtocol=tcp&IpPermissions.1.FromPort=80&IpPermissions.1.ToPort=80&IpPermissions.1.IpRanges.1.CidrIp=0.0.0.0/0"), &alice, "InvalidPermission.NotFound"),
        (format!("Action=AuthorizeSecurityGroupIngress&GroupId={web}&IpProtocol=tcp&FromPort=80&CidrIp=0.0.0.0/0"), &alice, "InvalidParameterValue"),
        (format!("Action=AuthorizeSecurityGroupIngress&GroupId={web}&IpProtocol=tcp&FromPort=80&ToPort=70000&CidrIp=0.0.0.0/0"), &alice, "InvalidParameterValue"),
        (format!("Action=AuthorizeSecurityGroupIngress&GroupId={web}&IpProtocol=gre&CidrIp=0.0.0.0/0"), &alice, "InvalidParameterValue"),
        (format!("Action=AuthorizeSecurityGroupIngress&GroupId={web}&IpProtocol=tcp&FromPort=80&ToPort=80&CidrIp=10.0.0.1/8"), &alice, "InvalidParameterValue"),
        (format!("Action=AuthorizeSecurityGroupIngress&GroupId={web}&IpPermissions.1.IpProtocol=tcp&IpPermissions.1.FromPort=1&IpPermissions.1.ToPort=2"), &alice, "InvalidPermission.Malformed"),
        (format!("Action=AuthorizeSecurityGroupIngress&GroupId={web}&IpProtocol=tcp&FromPort=80&ToPort=80&CidrIp=0.0.0.0/0"), &bob, "InvalidGroup.NotFound"),
        ("Action=AuthorizeSecurityGroupIngress&GroupId=sg-0123456789abcdef0&IpProtocol=-1&CidrIp=0.0.0.0/0".into(), &alice, "InvalidGroup.NotFound"),
        ("Action=AuthorizeSecurityGroupIngress&GroupId=sg-zz&IpProtocol=-1&CidrIp=0.0.0.0/0".into(), &alice, "InvalidGroupId.Malformed"),
        ("Action=CreateSecurityGroup&GroupName=web&GroupDescription=again".into(), &alice, "InvalidGroup.Duplicate"),
        ("Action=CreateSecurityGroup&GroupName=default&GroupDescription=x".into(), &alice, "InvalidGroup.Reserved"),
        ("Action=CreateSecurityGroup&GroupName=sg-1&GroupDescription=x".into(), &alice, "InvalidParameterValue"),
        ("Action=CreateSecurityGroup&GroupName=x".into(), &alice, "MissingParameter"),
        ("Action=CreateSecurityGroup&GroupName=x&GroupDescription=y&VpcId=vpc-0123456789abcdef0".into(), &alice, "InvalidVpcID.NotFound"),
        // Referenced by db's rule.
        (format!("Action=DeleteSecurityGroup&GroupId={web}"), &alice, "DependencyViolation"),
        (format!("Action=DeleteSecurityGroup&GroupId={db}"), &bob, "InvalidGroup.NotFound"),
        ("Action=DescribeSecurityGroupRules&SecurityGroupRuleId.1=sgr-0123456789abcdef0".into(), &alice, "InvalidSecurityGroupRuleId.NotFound"),
    ];
    for (form, who, expected) in &cases {
        ec2_err(&cloud, who, form, expected).await;
    }
    assert_eq!(network_rows(&cloud).await, before, "nothing half-created");

    // A group of another VPC cannot be referenced, nor used by a launch there.
    let vpc = first(&ec2(&cloud, &alice, "Action=CreateVpc&CidrBlock=10.0.0.0/16").await, "vpcId");
    let other =
        first(&ec2(&cloud, &alice, &format!("Action=CreateSecurityGroup&GroupName=other&GroupDescription=x&VpcId={vpc}")).await, "groupId");
    ec2_err(&cloud, &alice, &format!("Action=AuthorizeSecurityGroupIngress&GroupId={other}&IpPermissions.1.IpProtocol=-1&IpPermissions.1.UserIdGroupPairs.1.GroupId={web}"), "InvalidGroup.NotFound").await;
    let img = image(&cloud).await;
    ec2_err(
        &cloud,
        &alice,
        &format!("Action=RunInstances&ImageId={img}&InstanceType=t3.nano&MinCount=1&MaxCount=1&SecurityGroupId.1={other}"),
        "InvalidGroup.NotFound",
    )
    .await;
    ec2_err(
        &cloud,
        &bob,
        &format!("Action=RunInstances&ImageId={img}&InstanceType=t3.nano&MinCount=1&MaxCount=1&SecurityGroupId.1={web}"),
        "InvalidGroup.NotFound",
    )
    .await;

    // A group in use cannot be deleted; revoking and deleting then works.
    launch(&cloud, &alice, &format!("&SecurityGroupId.1={db}")).await;
    ec2_err(&cloud, &alice, &format!("Action=DeleteSecurityGroup&GroupId={db}"), "DependencyViolation").await;
    ec2(&cloud, &alice, &format!("Action=RevokeSecurityGroupIngress&GroupId={db}&IpPermissions.1.IpProtocol=tcp&IpPermissions.1.FromPort=5432&IpPermissions.1.ToPort=5432&IpPermissions.1.UserIdGroupPairs.1.GroupId={web}")).await;
    ec2(&cloud, &alice, &format!("Action=DeleteSecurityGroup&GroupId={web}")).await;
    let xml = ec2(&cloud, &alice, "Action=DescribeSecurityGroups&Filter.1.Name=group-name&Filter.1.Value.1=web").await;
    assert!(values(&xml, "groupId").is_empty(), "{xml}");
    // Revoking by rule id.
    let xml = ec2(&cloud, &alice, &format!("Action=DescribeSecurityGroupRules&Filter.1.Name=group-id&Filter.1.Value.1={db}")).await;
    let rule = first(&xml, "securityGroupRuleId");
    ec2(&cloud, &alice, &format!("Action=RevokeSecurityGroupEgress&GroupId={db}&SecurityGroupRuleId.1={rule}")).await;
    let xml = ec2(&cloud, &alice, &format!("Action=DescribeSecurityGroups&GroupId.1={db}")).await;
    assert!(xml.contains("<ipPermissionsEgress/>"), "{xml}");
    // Groups, VPCs and subnets take tags like instances (ResourceId lists may start at 0).
    let dvpc = default_vpc(&cloud, &alice).await;
    ec2(&cloud, &alice, &format!("Action=CreateTags&ResourceId.0={db}&ResourceId.1={dvpc}&Tag.0.Key=team&Tag.0.Value=data")).await;
    let xml = ec2(&cloud, &alice, "Action=DescribeTags&Filter.1.Name=resource-type&Filter.1.Value.1=security-group").await;
    assert_eq!(values(&xml, "resourceId"), vec![db.as_str()]);
    let xml = ec2(&cloud, &alice, "Action=DescribeSecurityGroups&Filter.1.Name=tag:team&Filter.1.Value.1=data").await;
    assert_eq!(values(&xml, "groupId"), vec![db.as_str()]);
    ec2_err(&cloud, &bob, &format!("Action=CreateTags&ResourceId.1={db}&Tag.1.Key=x&Tag.1.Value=y"), "InvalidGroup.NotFound").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn launches_get_addresses_in_their_subnets_zone_and_describe_shows_them() {
    let cloud = Cloud::start().await.unwrap();
    let _a = cloud.add_agent("a", "az1", 32, 32768, 500).await.unwrap();
    let _b = cloud.add_agent("b", "az2", 32, 32768, 500).await.unwrap();
    let img = cloud.register_test_image().await.unwrap().image_id;
    let alice = cloud.ec2_account("alice").await.unwrap();
    let vpc = first(&ec2(&cloud, &alice, "Action=CreateVpc&CidrBlock=10.0.0.0/16").await, "vpcId");
    let s2 = first(
        &ec2(&cloud, &alice, &format!("Action=CreateSubnet&VpcId={vpc}&CidrBlock=10.0.2.0/24&AvailabilityZone=az2")).await,
        "subnetId",
    );
    let s2b = first(
        &ec2(&cloud, &alice, &format!("Action=CreateSubnet&VpcId={vpc}&CidrBlock=10.0.3.0/24&AvailabilityZone=az2")).await,
        "subnetId",
    );
    let web =
        first(&ec2(&cloud, &alice, &format!("Action=CreateSecurityGroup&GroupName=web&GroupDescription=w&VpcId={vpc}")).await, "groupId");

    // A subnet fixes the zone; addresses are the subnet's, never one of the
    // four reserved at its start or its broadcast address.
    let run = format!("Action=RunInstances&ImageId={img}&InstanceType=t3.nano&MinCount=3&MaxCount=3&SubnetId={s2}&SecurityGroupId.1={web}");
    let xml = ec2(&cloud, &alice, &run).await;
    assert_eq!(values(&xml, "availabilityZone"), vec!["az2"; 3]);
    assert_eq!(
        values(&xml, "privateIpAddress").iter().filter(|a| a.starts_with("10.0.2.")).count(),
        9,
        "instance, interface, its address set: {xml}"
    );
    let mut addrs: Vec<&str> = values(&xml, "privateIpAddress");
    addrs.dedup();
    assert_eq!(addrs.len(), 3, "{addrs:?}");
    let hosts: std::collections::BTreeSet<u8> = addrs.iter().map(|a| a.rsplit('.').next().unwrap().parse().unwrap()).collect();
    assert_eq!(hosts.len(), 3, "distinct: {addrs:?}");
    assert!(hosts.iter().all(|h| (4..255).contains(h)), "{addrs:?}");
    assert!(xml.contains(&format!("<groupSet><item><groupId>{web}</groupId><groupName>web</groupName></item></groupSet>")), "{xml}");
    assert!(values(&xml, "macAddress").iter().all(|m| m.starts_with("02:") && m.len() == 17), "{xml}");
    let dns = format!("<privateDnsName>ip-{}.nimbus-1.compute.internal</privateDnsName>", addrs[0].replace('.', "-"));
    assert!(xml.contains(&dns), "{xml}");

    // Without a subnet: each instance in its zone's default subnet.
    let xml = ec2(&cloud, &alice, &format!("Action=RunInstances&ImageId={img}&InstanceType=t3.nano&MinCount=2&MaxCount=2")).await;
    let zones = values(&xml, "availabilityZone");
    let dvpc = default_vpc(&cloud, &alice).await;
    for (i, z) in zones.iter().enumerate() {
        let subnet = values(&xml, "subnetId")[i * 2].to_string();
        let s = ec2(&cloud, &alice, &format!("Action=DescribeSubnets&SubnetId.1={subnet}")).await;
        assert_eq!((values(&s, "availabilityZone")[0], values(&s, "defaultForAz")[0], values(&s, "vpcId")[0]), (*z, "true", dvpc.as_str()));
    }

    // An explicit address, then the same again.
    let one = launch(&cloud, &alice, &format!("&SubnetId={s2b}&PrivateIpAddress=10.0.3.100")).await;
    let before = network_rows(&cloud).await;
    let cases: Vec<(String, &str)> = vec![
        (format!("&SubnetId={s2b}&PrivateIpAddress=10.0.3.100"), "InvalidIPAddress.InUse"),
        (format!("&SubnetId={s2b}&PrivateIpAddress=10.0.3.2"), "InvalidParameterValue"),
        (format!("&SubnetId={s2b}&PrivateIpAddress=10.0.3.255"), "InvalidParameterValue"),
        (format!("&SubnetId={s2b}&PrivateIpAddress=10.0.4.9"), "InvalidParameterValue"),
        (format!("&SubnetId={s2b}&Placement.AvailabilityZone=az1"), "InvalidParameterValue"),
        (format!("&SubnetId={s2b}&NetworkInterface.1.DeviceIndex=0&NetworkInterface.1.SubnetId={s2b}"), "InvalidParameterCombination"),
        (format!("&NetworkInterface.1.DeviceIndex=1&NetworkInterface.1.SubnetId={s2b}"), "InvalidParameterValue"),
        ("&SubnetId=subnet-0123456789abcdef0".into(), "InvalidSubnetID.NotFound"),
        ("&SecurityGroupId.1=sg-0123456789abcdef0".into(), "InvalidGroup.NotFound"),
        ("&SecurityGroup.1=nosuch".into(), "InvalidGroup.NotFound"),
        (
            format!("&SubnetId={s2b}&NetworkInterface.1.DeviceIndex=0&NetworkInterface.1.AssociatePublicIpAddress=true"),
            "InvalidParameterCombination",
        ),
        ("&NetworkInterface.1.DeviceIndex=0&NetworkInterface.1.AssociatePublicIpAddress=true".into(), "InsufficientAddressCapacity"),
    ];
    for (extra, expected) in &cases {
        ec2_err(&cloud, &alice, &format!("Action=RunInstances&ImageId={img}&InstanceType=t3.nano&MinCount=1&MaxCount=1{extra}"), expected)
            .await;
    }
    ec2_err(
        &cloud,
        &alice,
        &format!("Action=RunInstances&ImageId={img}&InstanceType=t3.nano&MinCount=2&MaxCount=2&SubnetId={s2b}&PrivateIpAddress=10.0.3.101"),
        "InvalidParameterCombination",
    )
    .await;
    assert_eq!(network_rows(&cloud).await, before, "nothing half-created");

    // Two interfaces, the second kept after termination.
    let xml = ec2(&cloud, &alice, &format!("Action=RunInstances&ImageId={img}&InstanceType=t3.nano&MinCount=1&MaxCount=1&NetworkInterface.0.DeviceIndex=0&NetworkInterface.0.SubnetId={s2}&NetworkInterface.0.SecurityGroupId.0={web}&NetworkInterface.1.DeviceIndex=1&NetworkInterface.1.SubnetId={s2b}&NetworkInterface.1.DeleteOnTermination=false&TagSpecification.1.ResourceType=network-interface&TagSpecification.1.Tag.1.Key=role&TagSpecification.1.Tag.1.Value=dual&TagSpecification.2.ResourceType=volume&TagSpecification.2.Tag.1.Key=v&TagSpecification.2.Tag.1.Value=x")).await;
    let dual = first(&xml, "instanceId");
    assert_eq!(values(&xml, "deviceIndex"), vec!["0", "1"]);
    let enis = ec2(&cloud, &alice, &format!("Action=DescribeNetworkInterfaces&Filter.1.Name=attachment.instance-id&Filter.1.Value.1={dual}&Filter.2.Name=tag:role&Filter.2.Value.1=dual")).await;
    assert_eq!(values(&enis, "networkInterfaceId").len(), 2, "{enis}");
    let kept = values(&enis, "networkInterfaceId")[1].to_string();

    // Filters a client would use.
    let xml = ec2(&cloud, &alice, &format!("Action=DescribeInstances&Filter.1.Name=vpc-id&Filter.1.Value.1={vpc}")).await;
    assert_eq!(values(&xml, "reservationId").len(), 3, "the 3, the explicit one and the dual one");
    let xml = ec2(&cloud, &alice, "Action=DescribeInstances&Filter.1.Name=private-ip-address&Filter.1.Value.1=10.0.3.100").await;
    assert_eq!(values(&xml, "instanceId"), vec![one[0].as_str()]);
    let xml = ec2(
        &cloud,
        &alice,
        "Action=DescribeInstances&Filter.1.Name=private-dns-name&Filter.1.Value.1=ip-10-0-3-100.nimbus-1.compute.internal",
    )
    .await;
    assert_eq!(values(&xml, "instanceId"), vec![one[0].as_str()]);
    let xml = ec2(&cloud, &alice, &format!("Action=DescribeInstances&Filter.1.Name=instance.group-id&Filter.1.Value.1={web}")).await;
    assert_eq!(values(&xml, "reservationId").len(), 2);
    let xml = ec2(&cloud, &alice, &format!("Action=DescribeInstances&Filter.1.Name=subnet-id&Filter.1.Value.1={s2b}")).await;
    assert_eq!(values(&xml, "instanceId"), vec![one[0].as_str()], "subnet-id is the primary interface's");
    let xml =
        ec2(&cloud, &alice, &format!("Action=DescribeInstances&Filter.1.Name=network-interface.subnet-id&Filter.1.Value.1={s2b}")).await;
    assert_eq!(values(&xml, "reservationId").len(), 2);
    let xml = ec2(
        &cloud,
        &alice,
        &format!("Action=DescribeInstances&Filter.1.Name=network-interface.network-interface-id&Filter.1.Value.1={kept}"),
    )
    .await;
    assert_eq!(values(&xml, "instanceId"), vec![dual.as_str()]);
    ec2_err(&cloud, &alice, "Action=DescribeInstances&Filter.1.Name=network-interface.bogus&Filter.1.Value.1=x", "InvalidParameterValue")
        .await;

    // REST shows the same, and launches with the same fields.
    let (_, inst) = cloud
        .call_as(Some(&format!("{}:{}", alice.akid, alice.secret)), Method::GET, &format!("/v1/instances/{}", one[0]), None)
        .await
        .unwrap();
    assert_eq!((inst["private_ip_address"].as_str(), inst["subnet_id"].as_str()), (Some("10.0.3.100"), Some(s2b.as_str())));
    let alice_token = format!("{}:{}", alice.akid, alice.secret);
    let (status, r) = cloud
        .call_as(
            Some(&alice_token),
            Method::POST,
            "/v1/instances",
            Some(json!({"instance_type": "t3.nano", "subnet_id": s2b, "security_group_ids": [web], "private_ip_address": "10.0.3.50"})),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["instances"][0]["private_ip_address"], "10.0.3.50");
    assert_eq!(r["instances"][0]["security_groups"][0]["group_id"], web.as_str());

    // ClientToken: the network parameters are part of the request.
    let tok = format!("Action=RunInstances&ImageId={img}&InstanceType=t3.nano&MinCount=1&MaxCount=1&ClientToken=net-1&SubnetId={s2}");
    let a = first(&ec2(&cloud, &alice, &tok).await, "instanceId");
    assert_eq!(first(&ec2(&cloud, &alice, &tok).await, "instanceId"), a);
    ec2_err(&cloud, &alice, &tok.replace(&s2, &s2b), "IdempotentParameterMismatch").await;

    // Termination confirmed: the address goes back, the kept interface stays "available".
    ec2(&cloud, &alice, &format!("Action=TerminateInstances&InstanceId.1={dual}")).await;
    wait_state(&cloud, &alice, &dual, "terminated").await;
    let enis = ec2(&cloud, &alice, &format!("Action=DescribeNetworkInterfaces&NetworkInterfaceId.1={kept}")).await;
    assert_eq!(values(&enis, "status"), vec!["available"]);
    assert!(values(&enis, "attachment").is_empty());
    ec2(&cloud, &alice, &format!("Action=DeleteNetworkInterface&NetworkInterfaceId={kept}")).await;
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM network_interfaces WHERE account_id = $1 AND instance_id IS NULL")
        .bind(&alice.account_id)
        .fetch_one(cloud.db())
        .await
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_concurrent_launches_into_a_28_never_share_an_address() {
    let cloud = Cloud::start_with(CloudOptions { db_connections: 40, ..Default::default() }).await.unwrap();
    let _a = cloud.add_agent("a", "az1", 256, 1 << 20, 10_000).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let alice = cloud.ec2_account("alice").await.unwrap();
    let token = format!("{}:{}", alice.akid, alice.secret);
    let vpc = first(&ec2(&cloud, &alice, "Action=CreateVpc&CidrBlock=10.0.0.0/16").await, "vpcId");
    let subnet = first(&ec2(&cloud, &alice, &format!("Action=CreateSubnet&VpcId={vpc}&CidrBlock=10.0.0.0/28")).await, "subnetId");
    let launches = (0..100).map(|_| {
        cloud.call_as(Some(&token), Method::POST, "/v1/instances", Some(json!({"instance_type": "t3.nano", "subnet_id": subnet})))
    });
    let results = futures::future::join_all(launches).await;
    let (mut ok, mut full) = (Vec::new(), 0);
    for r in results {
        let (status, body) = r.unwrap();
        if status == 200 {
            ok.push(body["instances"][0]["private_ip_address"].as_str().unwrap().to_string());
        } else {
            assert_eq!((status.as_u16(), body["code"].as_str()), (400, Some("InsufficientFreeAddressesInSubnet")), "{body}");
            full += 1;
        }
    }
    ok.sort();
    let mut expected: Vec<String> = (4..15).map(|n| format!("10.0.0.{n}")).collect();
    expected.sort();
    assert_eq!(ok, expected, "eleven usable addresses, each once");
    assert_eq!(full, 89);
    assert_eq!(count(&cloud, "instances").await, 11, "the refused launches left no instance");
    assert_eq!(count(&cloud, "reservations").await, 11, "nor a reservation");
    let xml = ec2(&cloud, &alice, &format!("Action=DescribeSubnets&SubnetId.1={subnet}")).await;
    assert_eq!(values(&xml, "availableIpAddressCount"), vec!["0"]);
    // The constraint, not the code, refuses a second interface on an address.
    let e = sqlx::query(
        "INSERT INTO network_interfaces (id, account_id, vpc_id, subnet_id, private_ip, mac) \
         SELECT 'eni-0123456789abcdef0', account_id, vpc_id, subnet_id, private_ip, '02:00:00:00:00:01' FROM network_interfaces LIMIT 1",
    )
    .execute(cloud.db())
    .await
    .unwrap_err();
    assert!(e.to_string().contains("network_interfaces_one_address"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn elastic_ips_and_public_addresses() {
    let cloud =
        Cloud::start_with(CloudOptions { public_pool: Some("198.51.100.0/29"), max_elastic_ips: 2, ..Default::default() }).await.unwrap();
    let _a = cloud.add_agent("a", "az1", 32, 32768, 500).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let alice = cloud.ec2_account("alice").await.unwrap();
    let bob = cloud.ec2_account("bob").await.unwrap();
    // With a pool, default subnets map public addresses on launch.
    let xml = ec2(
        &cloud,
        &alice,
        "Action=RunInstances&ImageId=IMG&InstanceType=t3.nano&MinCount=1&MaxCount=1".replace("IMG", &image(&cloud).await).as_str(),
    )
    .await;
    let web = first(&xml, "instanceId");
    let auto = first(&xml, "ipAddress");
    assert!(auto.starts_with("198.51.100.") && auto != "198.51.100.0" && auto != "198.51.100.7", "{auto}");
    assert!(xml.contains(&format!("<association><publicIp>{auto}</publicIp>")), "{xml}");

    let e1 = ec2(&cloud, &alice, "Action=AllocateAddress&Domain=vpc").await;
    let (ip1, alloc1) = (first(&e1, "publicIp"), first(&e1, "allocationId"));
    let alloc2 = first(&ec2(&cloud, &alice, "Action=AllocateAddress").await, "allocationId");
    let before = network_rows(&cloud).await;
    ec2_err(&cloud, &alice, "Action=AllocateAddress", "AddressLimitExceeded").await;
    assert_eq!(network_rows(&cloud).await, before);

    // Associating replaces the address given at launch, which goes back to the pool.
    let assoc =
        first(&ec2(&cloud, &alice, &format!("Action=AssociateAddress&AllocationId={alloc1}&InstanceId={web}")).await, "associationId");
    let xml = ec2(&cloud, &alice, &format!("Action=DescribeInstances&InstanceId.1={web}")).await;
    assert_eq!(first(&xml, "ipAddress"), ip1);
    let (held,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM public_addresses WHERE host(public_ip) = $1").bind(&auto).fetch_one(cloud.db()).await.unwrap();
    assert_eq!(held, 0);
    let xml = ec2(&cloud, &alice, &format!("Action=DescribeAddresses&Filter.1.Name=instance-id&Filter.1.Value.1={web}")).await;
    assert_eq!((first(&xml, "allocationId"), first(&xml, "associationId")), (alloc1.clone(), assoc.clone()));
    // Again: the same association (idempotent).
    assert_eq!(
        first(&ec2(&cloud, &alice, &format!("Action=AssociateAddress&AllocationId={alloc1}&InstanceId={web}")).await, "associationId"),
        assoc
    );

    let other =
        launch(&cloud, &alice, "&NetworkInterface.1.DeviceIndex=0&NetworkInterface.1.AssociatePublicIpAddress=false").await.remove(0);
    let before = network_rows(&cloud).await;
    let cases: Vec<(String, &Ec2Keys, &str)> = vec![
        (format!("Action=AssociateAddress&AllocationId={alloc1}&InstanceId={other}"), &alice, "Resource.AlreadyAssociated"),
        (format!("Action=ReleaseAddress&AllocationId={alloc1}"), &alice, "InvalidIPAddress.InUse"),
        (format!("Action=ReleaseAddress&AllocationId={alloc1}"), &bob, "InvalidAllocationID.NotFound"),
        (format!("Action=AssociateAddress&AllocationId={alloc2}&InstanceId={web}"), &bob, "InvalidAllocationID.NotFound"),
        (format!("Action=DisassociateAddress&AssociationId={assoc}"), &bob, "InvalidAssociationID.NotFound"),
        (format!("Action=DescribeAddresses&PublicIp.1={ip1}"), &bob, "InvalidAddress.NotFound"),
        (format!("Action=DescribeAddresses&AllocationId.1={alloc1}"), &bob, "InvalidAllocationID.NotFound"),
        (format!("Action=AssociateAddress&AllocationId={alloc2}&InstanceId=i-0123456789abcdef0"), &alice, "InvalidInstanceID.NotFound"),
        (
            format!("Action=AssociateAddress&AllocationId={alloc2}&NetworkInterfaceId=eni-0123456789abcdef0"),
            &alice,
            "InvalidNetworkInterfaceID.NotFound",
        ),
        ("Action=ReleaseAddress&AllocationId=eipalloc-0123456789abcdef0".into(), &alice, "InvalidAllocationID.NotFound"),
        (
            "Action=DescribeNetworkInterfaces&NetworkInterfaceId.1=eni-0123456789abcdef0".into(),
            &alice,
            "InvalidNetworkInterfaceID.NotFound",
        ),
    ];
    for (form, who, expected) in &cases {
        ec2_err(&cloud, who, form, expected).await;
    }
    assert_eq!(network_rows(&cloud).await, before, "nothing changed");
    ec2(&cloud, &alice, &format!("Action=AssociateAddress&AllocationId={alloc1}&InstanceId={other}&AllowReassociation=true")).await;
    let xml = ec2(&cloud, &alice, &format!("Action=DescribeInstances&InstanceId.1={web}")).await;
    assert!(values(&xml, "ipAddress").is_empty(), "moved away: {xml}");
    // REST, by allocation id.
    let token = format!("{}:{}", alice.akid, alice.secret);
    let (status, v) = cloud
        .call_as(Some(&token), Method::POST, &format!("/v1/addresses/{alloc2}/associate"), Some(json!({"instance_id": web})))
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    assert!(v["association_id"].as_str().unwrap().starts_with("eipassoc-"));
    let disassociate = format!("/v1/addresses/{alloc2}/disassociate");
    assert_eq!(cloud.call_as(Some(&token), Method::POST, &disassociate, None).await.unwrap().0, 200);
    let (status, v) = cloud.call_as(Some(&token), Method::POST, &disassociate, None).await.unwrap();
    assert_eq!((status.as_u16(), v["code"].as_str()), (400, Some("InvalidAssociationID.NotFound")), "{v}");

    // Terminated and confirmed: the Elastic IP stays allocated, disassociated.
    ec2(&cloud, &alice, &format!("Action=TerminateInstances&InstanceId.1={other}")).await;
    wait_state(&cloud, &alice, &other, "terminated").await;
    let xml = ec2(&cloud, &alice, &format!("Action=DescribeAddresses&AllocationId.1={alloc1}")).await;
    assert!(values(&xml, "associationId").is_empty() && values(&xml, "publicIp") == vec![ip1.as_str()], "{xml}");
    ec2(&cloud, &alice, &format!("Action=ReleaseAddress&PublicIp={ip1}")).await;
    ec2(&cloud, &alice, &format!("Action=ReleaseAddress&AllocationId={alloc2}")).await;
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM public_addresses").fetch_one(cloud.db()).await.unwrap();
    assert_eq!(n, 0, "everything back in the pool");

    // An exhausted pool: EC2's capacity error, nothing allocated.
    let mut got = 0;
    for who in [&alice, &alice, &bob, &bob] {
        let (status, _) = cloud.ec2(who, "Action=AllocateAddress").await.unwrap();
        got += usize::from(status == 200);
    }
    assert_eq!(got, 4);
    launch(&cloud, &bob, "").await;
    launch(&cloud, &bob, "").await;
    ec2_err(
        &cloud,
        &alice,
        "Action=RunInstances&ImageId=IMG&InstanceType=t3.nano&MinCount=1&MaxCount=1".replace("IMG", &image(&cloud).await).as_str(),
        "InsufficientAddressCapacity",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_public_pool_means_no_public_addresses() {
    let cloud = Cloud::start().await.unwrap();
    let alice = cloud.ec2_account("alice").await.unwrap();
    ec2_err(&cloud, &alice, "Action=AllocateAddress", "InsufficientAddressCapacity").await;
    let xml = ec2(&cloud, &alice, "Action=DescribeAccountAttributes&AttributeName.1=vpc-max-elastic-ips").await;
    assert_eq!(values(&xml, "attributeValue"), vec!["5"]);
    assert_eq!(count(&cloud, "public_addresses").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn instance_status_attributes_and_changes() {
    let cloud = Cloud::start().await.unwrap();
    let agent = cloud.add_agent("a", "az1", 4, 8192, 100).await.unwrap();
    let img = cloud.register_test_image().await.unwrap().image_id;
    let alice = cloud.ec2_account("alice").await.unwrap();
    let xml =
        ec2(&cloud, &alice, &format!("Action=RunInstances&ImageId={img}&InstanceType=t3.nano&MinCount=1&MaxCount=1&UserData=aGVsbG8%3D"))
            .await;
    let id = first(&xml, "instanceId");
    wait_state(&cloud, &alice, &id, "running").await;

    let xml = ec2(&cloud, &alice, "Action=DescribeInstanceStatus").await;
    assert_eq!(values(&xml, "instanceId"), vec![id.as_str()]);
    assert!(xml.contains("<systemStatus><status>ok</status>"), "{xml}");
    // libcloud's lists start at 0.
    let xml = ec2(&cloud, &alice, &format!("Action=DescribeInstanceStatus&InstanceId.0={id}&IncludeAllInstances=true")).await;
    assert_eq!(values(&xml, "instanceId").len(), 1);
    for (attr, expected) in [
        ("instanceType", "<instanceType><value>t3.nano</value></instanceType>"),
        ("userData", "<userData><value>aGVsbG8=</value></userData>"),
        ("disableApiTermination", "<disableApiTermination><value>false</value></disableApiTermination>"),
        ("disableApiStop", "<disableApiStop><value>false</value></disableApiStop>"),
        ("instanceInitiatedShutdownBehavior", "<instanceInitiatedShutdownBehavior><value>stop</value></instanceInitiatedShutdownBehavior>"),
        ("groupSet", "<groupSet><item><groupId>sg-"),
    ] {
        let xml = ec2(&cloud, &alice, &format!("Action=DescribeInstanceAttribute&InstanceId={id}&Attribute={attr}")).await;
        assert!(xml.contains(expected), "{attr}: {xml}");
    }
    ec2_err(&cloud, &alice, &format!("Action=DescribeInstanceAttribute&InstanceId={id}&Attribute=bogus"), "InvalidParameterValue").await;

    // Type changes only when stopped, and within the host's capacity (4 vCPUs, one t3.nano holds 2).
    ec2_err(
        &cloud,
        &alice,
        &format!("Action=ModifyInstanceAttribute&InstanceId={id}&InstanceType.Value=t3.micro"),
        "IncorrectInstanceState",
    )
    .await;
    ec2(&cloud, &alice, &format!("Action=StopInstances&InstanceId.1={id}")).await;
    wait_state(&cloud, &alice, &id, "stopped").await;
    ec2_err(
        &cloud,
        &alice,
        &format!("Action=ModifyInstanceAttribute&InstanceId={id}&InstanceType.Value=m5.xlarge"),
        "InsufficientInstanceCapacity",
    )
    .await;
    assert_eq!(cloud.vcpu_accounting().await.unwrap()[0].2, 2, "nothing claimed");
    ec2(&cloud, &alice, &format!("Action=ModifyInstanceAttribute&InstanceId={id}&Attribute=instanceType&Value=t3.small")).await;
    let acc = cloud.vcpu_accounting().await.unwrap();
    assert_eq!((acc[0].2, acc[0].3), (2, 2), "the counters still add up");
    let xml = ec2(&cloud, &alice, &format!("Action=DescribeInstances&InstanceId.1={id}")).await;
    assert_eq!(values(&xml, "instanceType"), vec!["t3.small"]);

    // groupSet: the host's generation moves, and the assignment carries the new groups.
    let g = first(&ec2(&cloud, &alice, "Action=CreateSecurityGroup&GroupName=x&GroupDescription=x").await, "groupId");
    let host = agent.host_id.clone().unwrap();
    let (gen0,): (i64,) = sqlx::query_as("SELECT generation FROM hosts WHERE id = $1").bind(&host).fetch_one(cloud.db()).await.unwrap();
    ec2(&cloud, &alice, &format!("Action=ModifyInstanceAttribute&InstanceId={id}&GroupId.1={g}")).await;
    let (gen1,): (i64,) = sqlx::query_as("SELECT generation FROM hosts WHERE id = $1").bind(&host).fetch_one(cloud.db()).await.unwrap();
    assert!(gen1 > gen0);
    let xml = ec2(&cloud, &alice, &format!("Action=DescribeInstanceAttribute&InstanceId={id}&Attribute=groupSet")).await;
    assert_eq!(values(&xml, "groupId"), vec![g.as_str()]);
    ec2_err(
        &cloud,
        &alice,
        &format!("Action=ModifyInstanceAttribute&InstanceId={id}&GroupId.1=sg-0123456789abcdef0"),
        "InvalidGroup.NotFound",
    )
    .await;
    ec2_err(
        &cloud,
        &alice,
        &format!("Action=ModifyInstanceAttribute&InstanceId={id}&DisableApiTermination.Value=true"),
        "UnsupportedOperation",
    )
    .await;
}

/// Registers a host through the agent protocol with an underlay address;
/// returns (host id, bearer credential).
async fn register(cloud: &Cloud, name: &str, zone: &str, underlay: &str) -> (String, String) {
    let reg = json!({"name": name, "availability_zone": zone, "hypervisor": "test", "vcpus": 16, "memory_mib": 16384, "disk_gib": 200, "underlay_ip": underlay});
    let (status, cred) = cloud.call_as(Some(&cloud.join_token.clone()), Method::POST, "/v1/agent/register", Some(reg)).await.unwrap();
    assert_eq!(status, 200, "{cred}");
    let id = cred["host_id"].as_str().unwrap().to_string();
    (id.clone(), format!("{id}.{}", cred["secret"].as_str().unwrap()))
}

async fn poll(cloud: &Cloud, bearer: &str, after: i64, wait_ms: u64) -> Value {
    let (status, v) =
        cloud.call_as(Some(bearer), Method::GET, &format!("/v1/agent/assignments?after={after}&wait_ms={wait_ms}"), None).await.unwrap();
    assert_eq!(status, 200, "{v}");
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn host_network_peers_groups_members_and_nics_and_rule_changes_wake_the_right_hosts() {
    let cloud = Cloud::start().await.unwrap();
    cloud.register_test_image().await.unwrap();
    let (h1, c1) = register(&cloud, "n1", "az1", "10.9.0.1").await;
    let (h2, c2) = register(&cloud, "n2", "az1", "10.9.0.2").await;
    let (h3, c3) = register(&cloud, "n3", "az1", "10.9.0.3").await;
    let alice = cloud.ec2_account("alice").await.unwrap();
    let img = image(&cloud).await;
    let web = first(&ec2(&cloud, &alice, "Action=CreateSecurityGroup&GroupName=web&GroupDescription=w").await, "groupId");
    let db = first(&ec2(&cloud, &alice, "Action=CreateSecurityGroup&GroupName=db&GroupDescription=d").await, "groupId");
    ec2(&cloud, &alice, &format!("Action=AuthorizeSecurityGroupIngress&GroupId={db}&IpPermissions.1.IpProtocol=tcp&IpPermissions.1.FromPort=5432&IpPermissions.1.ToPort=5432&IpPermissions.1.UserIdGroupPairs.1.GroupId={web}")).await;
    // Spread: one web instance on each of two hosts, then a db instance on the third.
    let xml = ec2(
        &cloud,
        &alice,
        &format!("Action=RunInstances&ImageId={img}&InstanceType=t3.nano&MinCount=2&MaxCount=2&SecurityGroupId.1={web}"),
    )
    .await;
    let web_ips: Vec<String> = values(&xml, "privateIpAddress").into_iter().step_by(3).map(str::to_string).collect();
    let xml = ec2(
        &cloud,
        &alice,
        &format!("Action=RunInstances&ImageId={img}&InstanceType=t3.nano&MinCount=1&MaxCount=1&SecurityGroupId.1={db}"),
    )
    .await;
    let db_id = first(&xml, "instanceId");
    let hosts_used: std::collections::BTreeSet<String> = {
        let rows: Vec<(String,)> = sqlx::query_as("SELECT DISTINCT host_id FROM instances").fetch_all(cloud.db()).await.unwrap();
        rows.into_iter().map(|r| r.0).collect()
    };
    assert_eq!(hosts_used.len(), 3, "spread over the three hosts");
    let db_host = cloud.host_of(&db_id).await.unwrap();
    let (db_cred, web_creds): (&str, Vec<&str>) = match db_host.as_str() {
        h if h == h1 => (&c1, vec![&c2, &c3]),
        h if h == h2 => (&c2, vec![&c1, &c3]),
        _ => (&c3, vec![&c1, &c2]),
    };

    // The db host: its nic, the VPC with both peers, its group whose rule names web, web's members.
    let a = poll(&cloud, db_cred, 0, 0).await;
    let nic = &a["instances"][0]["nics"][0];
    assert!(nic["mac"].as_str().unwrap().starts_with("02:"));
    assert_eq!(nic["gateway"], "172.31.0.1");
    assert_eq!(nic["subnet"], json!({"addr": "172.31.0.0", "prefix": 20}));
    assert_eq!(nic["group_ids"], json!([db]));
    let net = &a["network"];
    assert_eq!(net["vpcs"].as_array().unwrap().len(), 1);
    let vpc = &net["vpcs"][0];
    assert_eq!(vpc["vni"], nic["vni"]);
    let mut peers: Vec<&str> = vpc["peers"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    peers.sort();
    let expected_peers: Vec<&str> =
        [("10.9.0.1", &h1), ("10.9.0.2", &h2), ("10.9.0.3", &h3)].into_iter().filter(|(_, h)| **h != db_host).map(|(ip, _)| ip).collect();
    assert_eq!(peers, expected_peers);
    assert_eq!(vpc["subnets"][0]["gateway"], "172.31.0.1");
    assert_eq!(net["groups"].as_array().unwrap().len(), 1);
    assert_eq!(net["groups"][0]["group_id"], db.as_str());
    assert!(
        net["groups"][0]["ingress"]
            .as_array()
            .unwrap()
            .contains(&json!({"protocol": "tcp", "ports": [5432, 5432], "peer": {"group": web}})),
        "{net}"
    );
    let mut members: Vec<&str> = net["members"][&web].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
    members.sort();
    let mut expected_members: Vec<&str> = web_ips.iter().map(String::as_str).collect();
    expected_members.sort();
    assert_eq!(members, expected_members, "web's members travel once, as addresses");
    // A web host: web's rules (no inbound), and web's own members.
    let w = poll(&cloud, web_creds[0], 0, 0).await;
    assert_eq!(w["network"]["groups"][0]["group_id"], web.as_str());
    assert_eq!(w["network"]["groups"][0]["ingress"], json!([]));
    assert_eq!(w["network"]["members"][&web].as_array().unwrap().len(), 2);

    // A rule on db wakes the db host's long poll at once, and only it.
    // (First the launches' network changes are delivered: they bump hosts
    // after their commits.)
    cloud.network_settled().await.unwrap();
    let g_db = poll(&cloud, db_cred, 0, 0).await["generation"].as_i64().unwrap();
    let g_web: Vec<i64> = {
        let mut v = Vec::new();
        for c in &web_creds {
            v.push(poll(&cloud, c, 0, 0).await["generation"].as_i64().unwrap());
        }
        v
    };
    let waiting = {
        let (url, cred) = (cloud.url.clone(), db_cred.to_string());
        let http = cloud.http.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let v: Value = http
                .get(format!("{url}/v1/agent/assignments?after={g_db}&wait_ms=30000"))
                .bearer_auth(cred)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            (v, started.elapsed())
        })
    };
    // Let the poll start waiting: it answers at once only if the generation moved.
    cloud.wait_until(T, || async { Ok(cloud.service.events.waiting(&db_host) > 0) }).await.unwrap();
    let started = std::time::Instant::now();
    ec2(
        &cloud,
        &alice,
        &format!("Action=AuthorizeSecurityGroupIngress&GroupId={db}&IpProtocol=icmp&FromPort=8&ToPort=-1&CidrIp=10.0.0.0/8"),
    )
    .await;
    let (woken, _) = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("the long poll returned").unwrap();
    assert!(started.elapsed() < Duration::from_secs(2), "woken within {:?}", started.elapsed());
    assert!(woken["generation"].as_i64().unwrap() > g_db);
    assert_eq!(woken["full"], false);
    assert!(woken["instances"].as_array().unwrap().is_empty(), "a rule change is a delta with no instance");
    assert!(
        woken["network"]["groups"][0]["ingress"]
            .as_array()
            .unwrap()
            .contains(&json!({"protocol": "icmp", "ports": [8, 65535], "peer": {"cidr": {"addr": "10.0.0.0", "prefix": 8}}})),
        "{woken}"
    );
    for (c, g) in web_creds.iter().zip(&g_web) {
        assert_eq!(poll(&cloud, c, 0, 0).await["generation"].as_i64().unwrap(), *g, "web hosts not bumped by a db rule");
    }

    // A new web member changes db's members: the db host is bumped too.
    let g_db = poll(&cloud, db_cred, 0, 0).await["generation"].as_i64().unwrap();
    ec2(&cloud, &alice, &format!("Action=RunInstances&ImageId={img}&InstanceType=t3.nano&MinCount=1&MaxCount=1&SecurityGroupId.1={web}&Placement.AvailabilityZone=az1")).await;
    let after = poll(&cloud, db_cred, g_db, 5000).await;
    assert!(after["generation"].as_i64().unwrap() > g_db);
    assert_eq!(after["network"]["members"][&web].as_array().unwrap().len(), 3);

    // Another account's network never shows on these hosts' answers as theirs: bob's VPC has another VNI.
    let bob = cloud.ec2_account("bob").await.unwrap();
    let xml = ec2(&cloud, &bob, &format!("Action=RunInstances&ImageId={img}&InstanceType=t3.nano&MinCount=1&MaxCount=1")).await;
    let bob_host = cloud.host_of(&first(&xml, "instanceId")).await.unwrap();
    let cred = [(&h1, &c1), (&h2, &c2), (&h3, &c3)].into_iter().find(|(h, _)| **h == bob_host).map(|(_, c)| c.clone()).unwrap();
    let v = poll(&cloud, &cred, 0, 0).await;
    let vnis: std::collections::BTreeSet<i64> =
        v["network"]["vpcs"].as_array().unwrap().iter().map(|v| v["vni"].as_i64().unwrap()).collect();
    assert_eq!(vnis.len(), 2, "two VPCs, two VNIs on this host: {v}");
}
