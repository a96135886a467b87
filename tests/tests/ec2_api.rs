//! The EC2 Query front door over the real control plane, with requests
//! signed by the `aws-sigv4` crate (the AWS SDK's own signer).

use nimbus_control_plane::api::ec2::action::{Action, DryRunRule};
use nimbus_tests::{xml_error_code as error_code, xml_values as between, Cloud, CloudOptions};
use serde_json::json;
use std::time::{Duration, SystemTime};

const T: Duration = Duration::from_secs(30);

struct Keys {
    akid: String,
    secret: String,
}

async fn account(cloud: &Cloud, name: &str) -> Keys {
    let a = cloud.post("/v1/admin/accounts", json!({"name": name})).await.unwrap();
    Keys { akid: a["access_key_id"].as_str().unwrap().into(), secret: a["secret_access_key"].as_str().unwrap().into() }
}

/// POSTs a signed form to the EC2 endpoint; returns (status, body).
async fn ec2_at(cloud: &Cloud, keys: &Keys, form: &str, at: SystemTime) -> (u16, String) {
    let (status, body) = cloud.ec2_signed(&keys.akid, &keys.secret, form, at, "nimbus-1", "ec2").await.unwrap();
    (status, body)
}

async fn ec2(cloud: &Cloud, keys: &Keys, form: &str) -> (u16, String) {
    ec2_at(cloud, keys, form, SystemTime::now()).await
}

#[tokio::test]
async fn signed_requests_launch_describe_and_terminate_per_account() {
    let cloud = Cloud::start().await.unwrap();
    let _agent = cloud.add_agent("a", "az1", 16, 16384, 200).await.unwrap();
    let image = cloud.register_test_image().await.unwrap();
    let alice = account(&cloud, "alice").await;
    let bob = account(&cloud, "bob").await;
    let v = "Version=2016-11-15";

    let (status, xml) = ec2(&cloud, &alice, &format!("Action=DescribeInstanceTypes&{v}&InstanceType.1=t3.nano")).await;
    assert_eq!(status, 200, "{xml}");
    assert!(xml.contains("<DescribeInstanceTypesResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\">"));
    assert_eq!(between(&xml, "instanceType"), vec!["t3.nano"]);
    assert_eq!(between(&xml, "defaultVCpus"), vec!["2"]);
    let (_, xml) = ec2(&cloud, &alice, &format!("Action=DescribeAvailabilityZones&{v}")).await;
    assert_eq!(between(&xml, "zoneName"), vec!["az1"]);
    let (_, xml) = ec2(&cloud, &alice, &format!("Action=DescribeImages&{v}&ImageId.1={}", image.image_id)).await;
    assert_eq!(between(&xml, "imageId"), vec![image.image_id.as_str()]);

    // DryRun: the would-succeed answer, and nothing launched.
    let run = format!("Action=RunInstances&{v}&ImageId={}&InstanceType=t3.nano&MinCount=2&MaxCount=2&UserData=aGk%3D", image.image_id);
    let (status, xml) = ec2(&cloud, &alice, &format!("{run}&DryRun=true")).await;
    assert_eq!((status, error_code(&xml)), (412, "DryRunOperation"), "{xml}");
    let (status, xml) = ec2(&cloud, &alice, &format!("{run}&InstanceType=z9.huge&DryRun=true").replace("InstanceType=t3.nano&", "")).await;
    assert_eq!((status, error_code(&xml)), (400, "InvalidParameterValue"), "a DryRun of a bad request answers the real error: {xml}");

    let (status, xml) = ec2(&cloud, &alice, &run).await;
    assert_eq!(status, 200, "{xml}");
    let ids: Vec<String> = between(&xml, "instanceId").into_iter().map(str::to_string).collect();
    assert_eq!(ids.len(), 2);
    assert_eq!(between(&xml, "name"), vec!["pending", "pending"]);
    let (n,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM instances WHERE account_id <> '000000000000'").fetch_one(cloud.db()).await.unwrap();
    assert_eq!(n, 2);

    // Alice sees hers, grouped in one reservation; Bob sees nothing and cannot touch them.
    let (_, xml) = ec2(&cloud, &alice, &format!("Action=DescribeInstances&{v}&Filter.1.Name=instance-type&Filter.1.Value.1=t3.nano")).await;
    assert_eq!(between(&xml, "reservationId").len(), 1);
    assert_eq!(between(&xml, "instanceId").len(), 2);
    let (status, xml) = ec2(&cloud, &bob, &format!("Action=DescribeInstances&{v}")).await;
    assert_eq!(status, 200);
    assert!(between(&xml, "instanceId").is_empty(), "{xml}");
    let (status, xml) = ec2(&cloud, &bob, &format!("Action=TerminateInstances&{v}&InstanceId.1={}", ids[0])).await;
    assert_eq!((status, error_code(&xml)), (400, "InvalidInstanceID.NotFound"), "{xml}");
    let (status, xml) = ec2(&cloud, &bob, &format!("Action=DescribeInstances&{v}&InstanceId.1={}", ids[0])).await;
    assert_eq!((status, error_code(&xml)), (400, "InvalidInstanceID.NotFound"));

    let (status, xml) = ec2(&cloud, &alice, &format!("Action=TerminateInstances&{v}&InstanceId.1={}", ids[0])).await;
    assert_eq!(status, 200, "{xml}");
    assert_eq!(between(&xml, "currentState").len(), 1);
    assert!(xml.contains("<currentState><code>32</code><name>shutting-down</name></currentState>"), "{xml}");
}

/// `xml` without its request id, with `id` written as `<id>`.
fn comparable(xml: &str, id: &str) -> String {
    let mut out = xml.replace(id, "<id>");
    for tag in ["RequestID", "requestId"] {
        let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
        if let (Some(i), Some(j)) = (out.find(&open), out.find(&close)) {
            out.replace_range(i + open.len()..j, "");
        }
    }
    out
}

/// Every action of Bob's that names one of Alice's instances or key pairs
/// answers exactly as for one that does not exist and changes nothing; his
/// lists, tags and account attributes are his own; Alice's client token
/// is not his. Alice's GetConsoleOutput carries her console, base64.
#[tokio::test]
async fn another_accounts_resources_answer_as_missing_ones() {
    use base64::Engine;
    let cloud = Cloud::start().await.unwrap();
    let agent = cloud.add_agent("a", "az1", 32, 32768, 500).await.unwrap();
    let image = cloud.register_test_image().await.unwrap();
    let alice = account(&cloud, "alice").await;
    let bob = account(&cloud, "bob").await;
    let alice_rest = format!("{}:{}", alice.akid, alice.secret);
    let v = "Version=2016-11-15";

    // Alice: a key pair, two tagged instances (one stopped), console output, her own limits.
    let (status, xml) = ec2(&cloud, &alice, &format!("Action=CreateKeyPair&{v}&KeyName=k1")).await;
    assert_eq!(status, 200, "{xml}");
    let run = format!(
        "Action=RunInstances&{v}&ImageId={}&InstanceType=t3.nano&MinCount=2&MaxCount=2&ClientToken=shared-token\
         &TagSpecification.1.ResourceType=instance&TagSpecification.1.Tag.1.Key=team&TagSpecification.1.Tag.1.Value=red",
        image.image_id
    );
    let (status, xml) = ec2(&cloud, &alice, &run).await;
    assert_eq!(status, 200, "{xml}");
    let ids: Vec<String> = between(&xml, "instanceId").into_iter().map(str::to_string).collect();
    let alices_reservation = between(&xml, "reservationId")[0].to_string();
    cloud.wait_for_state_as(&alice_rest, &ids, "running", T).await.unwrap();
    let (status, xml) = ec2(&cloud, &alice, &format!("Action=StopInstances&{v}&InstanceId.1={}", ids[1])).await;
    assert_eq!(status, 200, "{xml}");
    cloud.wait_for_state_as(&alice_rest, &ids[1..], "stopped", T).await.unwrap();
    let text = b"alice's console \x1b[1mbold\x1b[0m\r\nNIMBUS-READY\r\n\xff";
    std::fs::write(agent.state_dir.join("instances").join(&ids[0]).join("console.log"), text).unwrap();
    let get_console = format!("Action=GetConsoleOutput&{v}&InstanceId={}", ids[0]);
    cloud
        .wait_until(T, || async {
            let (status, xml) = ec2(&cloud, &alice, &get_console).await;
            assert_eq!(status, 200, "{xml}");
            Ok(between(&xml, "output").first().is_some_and(|o| !o.is_empty()))
        })
        .await
        .expect("the console reaches the control plane");
    let (_, xml) = ec2(&cloud, &alice, &get_console).await;
    assert_eq!(between(&xml, "instanceId"), vec![ids[0].as_str()]);
    let output = base64::engine::general_purpose::STANDARD.decode(between(&xml, "output")[0]).unwrap();
    assert_eq!(output, text, "GetConsoleOutput: the console, base64");
    let alice_id: (String,) =
        sqlx::query_as("SELECT account_id FROM instances WHERE id = $1").bind(&ids[0]).fetch_one(cloud.db()).await.unwrap();
    cloud
        .call(reqwest::Method::PUT, &format!("/v1/admin/accounts/{}/limits", alice_id.0), Some(json!({"max_instances": 7})))
        .await
        .unwrap();

    // Bob, on each of them, and on one nobody has.
    let before = cloud.everything().await.unwrap();
    let mut forms = Vec::new();
    for id in &ids {
        for action in [
            "DescribeInstances&InstanceId.1={}",
            "DescribeInstances&Filter.1.Name=instance-id&Filter.1.Value.1={}",
            "StopInstances&InstanceId.1={}",
            "StopInstances&DryRun=true&InstanceId.1={}",
            "StartInstances&InstanceId.1={}",
            "RebootInstances&InstanceId.1={}",
            "TerminateInstances&InstanceId.1={}",
            "GetConsoleOutput&InstanceId={}",
            "CreateTags&ResourceId.1={}&Tag.1.Key=x&Tag.1.Value=y",
            "DeleteTags&ResourceId.1={}&Tag.1.Key=team",
            "DescribeTags&Filter.1.Name=resource-id&Filter.1.Value.1={}",
        ] {
            forms.push((format!("Action={}&{v}", action.replace("{}", id)), id.clone(), "i-0123456789abcdef0"));
        }
    }
    for action in ["DescribeKeyPairs&KeyName.1=k1", "DeleteKeyPair&KeyName=k1"] {
        forms.push((format!("Action={action}&{v}"), "k1".to_string(), "no-such-key"));
    }
    let run_with_key = format!("Action=RunInstances&{v}&ImageId={}&InstanceType=t3.nano&MinCount=1&MaxCount=1&KeyName=k1", image.image_id);
    forms.push((run_with_key, "k1".to_string(), "no-such-key"));
    for (form, theirs, nobodys) in forms {
        let (status, xml) = ec2(&cloud, &bob, &form).await;
        let (ghost_status, ghost_xml) = ec2(&cloud, &bob, &form.replace(&theirs, nobodys)).await;
        assert_eq!((status, comparable(&xml, &theirs)), (ghost_status, comparable(&ghost_xml, nobodys)), "{form}: as if missing");
        if theirs.starts_with("i-") && !form.contains("Filter.1") {
            assert_eq!((status, error_code(&xml)), (400, "InvalidInstanceID.NotFound"), "{form}");
        }
        assert_eq!(cloud.everything().await.unwrap(), before, "{form}: changed nothing");
    }
    // What Bob lists is his own.
    for (action, tag) in [("DescribeInstances", "instanceId"), ("DescribeKeyPairs", "keyName"), ("DescribeTags", "resourceId")] {
        let (status, xml) = ec2(&cloud, &bob, &format!("Action={action}&{v}")).await;
        assert_eq!((status, between(&xml, tag).len()), (200, 0), "{action}: {xml}");
    }
    let (_, xml) = ec2(&cloud, &bob, &format!("Action=DescribeAccountAttributes&{v}&AttributeName.1=max-instances")).await;
    assert_eq!(between(&xml, "attributeValue"), vec!["256"], "{xml}");
    let (_, xml) = ec2(&cloud, &alice, &format!("Action=DescribeAccountAttributes&{v}&AttributeName.1=max-instances")).await;
    assert_eq!(between(&xml, "attributeValue"), vec!["7"], "{xml}");

    // One client token, two accounts: Bob's launch is his own reservation.
    let (status, xml) = ec2(&cloud, &bob, &run).await;
    assert_eq!(status, 200, "{xml}");
    assert_ne!(between(&xml, "reservationId"), vec![alices_reservation.as_str()]);
    let his: Vec<&str> = between(&xml, "instanceId");
    assert_eq!(his.len(), 2);
    assert!(his.iter().all(|i| !ids.iter().any(|a| a == i)), "{xml}");
    let (_, xml) = ec2(&cloud, &alice, &format!("Action=DescribeInstances&{v}")).await;
    assert_eq!(between(&xml, "instanceId"), ids.iter().map(String::as_str).collect::<Vec<_>>(), "{xml}");
    assert_eq!(between(&xml, "name"), vec!["running", "stopped"], "{xml}");
}

#[tokio::test]
async fn bad_requests_get_ec2_errors_and_create_nothing() {
    let cloud = Cloud::start().await.unwrap();
    let _agent = cloud.add_agent("a", "az1", 2, 16384, 200).await.unwrap();
    let image = cloud.register_test_image().await.unwrap();
    let keys = account(&cloud, "carol").await;
    let v = "Version=2016-11-15";
    // Client errors are 4xx (SDKs retry 5xx); only lack of capacity is a 500, as in EC2.
    let cases: Vec<(String, u16, &str)> = vec![
        (format!("Action=FlyToTheMoon&{v}"), 400, "InvalidAction"),
        ("Action=DescribeInstances&Version=2014-01-01".into(), 400, "InvalidParameterValue"),
        ("Action=DescribeInstances".into(), 400, "MissingParameter"),
        (v.to_string(), 400, "MissingParameter"),
        (format!("Action=DescribeInstances&{v}&InstanceId.1=i-xyz"), 400, "InvalidInstanceID.Malformed"),
        (format!("Action=DescribeInstances&{v}&InstanceId.1=i-0123456789abcdef0"), 400, "InvalidInstanceID.NotFound"),
        (format!("Action=DescribeInstances&{v}&Filter.1.Name=bogus&Filter.1.Value.1=x"), 400, "InvalidParameterValue"),
        (format!("Action=DescribeInstances&{v}&MaxResults=2"), 400, "InvalidParameterValue"),
        (format!("Action=DescribeInstanceStatus&{v}&MaxResults=2"), 400, "InvalidParameterValue"),
        (format!("Action=DescribeInstanceStatus&{v}&MaxResults=1001"), 400, "InvalidParameterValue"),
        (format!("Action=DescribeImages&{v}&ImageId.1=ami-00000000000000000"), 400, "InvalidAMIID.NotFound"),
        (format!("Action=RunInstances&{v}&ImageId=ami-bad&MinCount=1&MaxCount=1"), 400, "InvalidAMIID.Malformed"),
        (format!("Action=RunInstances&{v}&ImageId={}&MinCount=1", image.image_id), 400, "MissingParameter"),
        (
            format!("Action=RunInstances&{v}&ImageId={}&MinCount=0&MaxCount=0&InstanceType=t3.nano", image.image_id),
            400,
            "InvalidParameterValue",
        ),
        (
            format!("Action=RunInstances&{v}&ImageId={}&MinCount=-1&MaxCount=1&InstanceType=t3.nano", image.image_id),
            400,
            "InvalidParameterValue",
        ),
        (
            format!("Action=RunInstances&{v}&ImageId={}&MinCount=1&MaxCount=1000000&InstanceType=t3.nano", image.image_id),
            400,
            "InvalidParameterValue",
        ),
        (
            format!(
                "Action=RunInstances&{v}&ImageId={}&MinCount=1&MaxCount=1&InstanceType=t3.nano&UserData={}",
                image.image_id,
                "QUFB".repeat(6000)
            ),
            400,
            "InvalidParameterValue",
        ),
        (
            format!("Action=RunInstances&{v}&ImageId={}&MinCount=2&MaxCount=2&InstanceType=t3.nano", image.image_id),
            500,
            "InsufficientInstanceCapacity",
        ),
        ("%%%garbage&&==".into(), 400, "MissingParameter"),
    ];
    for (form, status, code) in cases {
        let (got, xml) = ec2(&cloud, &keys, &form).await;
        assert_eq!((got, error_code(&xml)), (status, code), "{form}: {xml}");
        assert!(xml.contains("<Response><Errors><Error><Code>") && xml.contains("</Error></Errors><RequestID>"), "{xml}");
    }
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM instances").fetch_one(cloud.db()).await.unwrap();
    assert_eq!(n, 0, "nothing was created");
}

#[tokio::test]
async fn authentication_failures() {
    let cloud = Cloud::start().await.unwrap();
    let keys = account(&cloud, "dave").await;
    let form = "Action=DescribeInstances&Version=2016-11-15";
    let wrong = Keys { akid: keys.akid.clone(), secret: "x".repeat(40) };
    let (status, xml) = ec2(&cloud, &wrong, form).await;
    assert_eq!((status, error_code(&xml)), (401, "AuthFailure"));
    let unknown = Keys { akid: "AKIAAAAAAAAAAAAAAAAA".into(), secret: keys.secret.clone() };
    let (status, xml) = ec2(&cloud, &unknown, form).await;
    assert_eq!((status, error_code(&xml)), (401, "AuthFailure"));
    let (status, xml) = ec2_at(&cloud, &keys, form, SystemTime::now() - Duration::from_secs(20 * 60)).await;
    assert_eq!((status, error_code(&xml)), (400, "RequestExpired"));
    let resp = cloud.http.post(format!("{}/", cloud.url)).body(form).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    assert_eq!(error_code(&resp.text().await.unwrap()), "MissingAuthenticationToken");
    // The admin bearer token is not an EC2 credential.
    let resp = cloud.http.post(format!("{}/", cloud.url)).bearer_auth(&cloud.admin_token).body(form).send().await.unwrap();
    // An Authorization header that is no SigV4 one: malformed, as AWS answers it.
    assert_eq!(resp.status().as_u16(), 400);
    assert_eq!(error_code(&resp.text().await.unwrap()), "IncompleteSignature");
    let (status, _) = ec2(&cloud, &keys, form).await;
    assert_eq!(status, 200);
}

/// Parameters besides the targets that let `action` decode, so that a
/// DryRun gets as far as its check.
fn filler(action: Action) -> &'static str {
    match action {
        Action::CreateTags => "&Tag.1.Key=k&Tag.1.Value=v",
        Action::DeleteTags => "&Tag.1.Key=k",
        Action::ModifyInstanceMetadataOptions => "&HttpTokens=required",
        Action::CreateImage => "&Name=dry-image",
        Action::CreateSubnet => "&CidrBlock=10.7.1.0/24",
        Action::ModifySubnetAttribute => "&MapPublicIpOnLaunch.Value=true",
        Action::CreateSecurityGroup => "&GroupName=dry&GroupDescription=dry",
        Action::AuthorizeSecurityGroupIngress
        | Action::AuthorizeSecurityGroupEgress
        | Action::RevokeSecurityGroupIngress
        | Action::RevokeSecurityGroupEgress => "&IpProtocol=tcp&FromPort=22&ToPort=22&CidrIp=192.0.2.0/24",
        Action::DescribeInstanceAttribute => "&Attribute=instanceType",
        Action::ModifyInstanceAttribute => "&InstanceType.Value=t3.small",
        Action::CreateVpc => "&CidrBlock=10.8.0.0/16",
        Action::CreateKeyPair => "&KeyName=dry",
        Action::ImportKeyPair => "&KeyName=dry&PublicKeyMaterial=c3NoLWVkMjU1MTkgQUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSUdtVmRXZjhmNlpoRkRpTlFTSmdMQ0lEV0dEZ1lEY3l2Tmw3L2N6U0p1QXggZHJ5",
        Action::DeleteKeyPair => "&KeyName=dry",
        _ => "",
    }
}

/// Every action's DryRun follows the one rule of `api::ec2::action`: with
/// the caller's own resources it answers DryRunOperation; naming another
/// account's (or nobody's) resource it answers that resource's NotFound, as
/// the action itself would; and no DryRun changes anything.
#[tokio::test]
async fn dry_run_checks_the_same_things_for_every_action() {
    let cloud = Cloud::start_with(CloudOptions { public_pool: Some("198.51.100.0/29"), ..Default::default() }).await.unwrap();
    let _agent = cloud.add_agent("a", "az1", 32, 32768, 500).await.unwrap();
    let image = cloud.register_test_image().await.unwrap();
    let alice = account(&cloud, "alice").await;
    let bob = account(&cloud, "bob").await;
    let v = "Version=2016-11-15";
    let one = |xml: &str, tag: &str| between(xml, tag).first().map(|s| s.to_string()).unwrap_or_else(|| panic!("no {tag}: {xml}"));
    let ok = |(status, xml): (u16, String)| {
        assert_eq!(status, 200, "{xml}");
        xml
    };

    // Alice's resources, one of each kind a target names.
    let run = format!("Action=RunInstances&{v}&ImageId={}&InstanceType=t3.nano&MinCount=1&MaxCount=1", image.image_id);
    let xml = ok(ec2(&cloud, &alice, &run).await);
    let instance = one(&xml, "instanceId");
    let interface = one(&xml, "networkInterfaceId");
    // Running before anything is compared: its start is no DryRun's doing.
    cloud.wait_for_state_as(&format!("{}:{}", alice.akid, alice.secret), std::slice::from_ref(&instance), "running", T).await.unwrap();
    let vpc = one(&ok(ec2(&cloud, &alice, &format!("Action=CreateVpc&{v}&CidrBlock=10.7.0.0/16")).await), "vpcId");
    let subnet = one(&ok(ec2(&cloud, &alice, &format!("Action=CreateSubnet&{v}&VpcId={vpc}&CidrBlock=10.7.0.0/24")).await), "subnetId");
    let group = one(
        &ok(ec2(&cloud, &alice, &format!("Action=CreateSecurityGroup&{v}&VpcId={vpc}&GroupName=g&GroupDescription=d")).await),
        "groupId",
    );
    let allocation = one(&ok(ec2(&cloud, &alice, &format!("Action=AllocateAddress&{v}")).await), "allocationId");
    let own = |param: &str| -> Option<String> {
        Some(match param {
            "InstanceId" | "ResourceId" => instance.clone(),
            "VpcId" => vpc.clone(),
            "SubnetId" => subnet.clone(),
            "GroupId" => group.clone(),
            "NetworkInterfaceId" => interface.clone(),
            "AllocationId" => allocation.clone(),
            // Alice owns no image (the test image is the operator's).
            _ => return None,
        })
    };
    let nobodys = |param: &str| match param {
        "InstanceId" | "ResourceId" => "i-0123456789abcdef0",
        "VpcId" => "vpc-0123456789abcdef0",
        "SubnetId" => "subnet-0123456789abcdef0",
        "GroupId" => "sg-0123456789abcdef0",
        "NetworkInterfaceId" => "eni-0123456789abcdef0",
        "AllocationId" => "eipalloc-0123456789abcdef0",
        "ImageId" => "ami-0123456789abcdef0",
        other => panic!("no id for {other}"),
    };
    // A target named in the form it takes: a list for these, else single.
    let listed = |action: Action, param: &str| {
        matches!(param, "ResourceId")
            || (param == "InstanceId" && action.name().ends_with("Instances"))
            || param == "GroupId" && action == Action::ModifyInstanceAttribute
    };

    let before = cloud.everything().await.unwrap();
    let mut checked = 0;
    for &action in Action::ALL {
        let base = format!("Action={action}&{v}&DryRun=true{}", filler(action));
        match action.dry_run_rule() {
            DryRunRule::Launch => {
                assert_eq!(error_code(&ec2(&cloud, &bob, &run.replace("MinCount", "DryRun=true&MinCount")).await.1), "DryRunOperation");
                let bad = run.replace(&image.image_id, "ami-0123456789abcdef0").replace("MinCount", "DryRun=true&MinCount");
                assert_eq!(error_code(&ec2(&cloud, &bob, &bad).await.1), "InvalidAMIID.NotFound");
            }
            DryRunRule::Nothing => {
                let (status, xml) = ec2(&cloud, &bob, &base).await;
                assert_eq!((status, error_code(&xml)), (412, "DryRunOperation"), "{action}: {xml}");
            }
            DryRunRule::Targets(params) => {
                let form = |id: &dyn Fn(&str) -> String| {
                    params.iter().fold(base.clone(), |f, p| {
                        let key = if listed(action, p) { format!("{p}.1") } else { p.to_string() };
                        format!("{f}&{key}={}", id(p))
                    })
                };
                if params.iter().all(|p| own(p).is_some()) {
                    let (status, xml) = ec2(&cloud, &alice, &form(&|p| own(p).unwrap())).await;
                    assert_eq!((status, error_code(&xml)), (412, "DryRunOperation"), "{action} of her own: {xml}");
                }
                // Each target in turn another account's (Bob's view of Alice's) and nobody's.
                for (i, p) in params.iter().enumerate() {
                    let theirs = form(&|q| {
                        if q == params[i] {
                            own(q).unwrap_or_else(|| image.image_id.clone())
                        } else {
                            own(q).unwrap_or_default()
                        }
                    });
                    let ghost = form(&|q| if q == params[i] { nobodys(q).to_string() } else { own(q).unwrap_or_default() });
                    let (status, xml) = ec2(&cloud, &bob, &theirs).await;
                    assert_eq!(status, 400, "{action} {p} of another account: {xml}");
                    assert!(error_code(&xml).ends_with("NotFound"), "{action} {p} of another account: {xml}");
                    let (ghost_status, ghost_xml) = ec2(&cloud, &alice, &ghost).await;
                    assert_eq!(ghost_status, 400, "{action} {p} of nobody: {ghost_xml}");
                    assert!(error_code(&ghost_xml).ends_with("NotFound"), "{action} {p} of nobody: {ghost_xml}");
                }
            }
        }
        checked += 1;
    }
    assert_eq!(checked, Action::ALL.len());
    assert_eq!(cloud.everything().await.unwrap(), before, "no DryRun changed anything");
    // An action Nimbus does not know.
    let (status, xml) = ec2(&cloud, &bob, &format!("Action=DescribeVolumez&{v}")).await;
    assert_eq!((status, error_code(&xml)), (400, "InvalidAction"), "{xml}");
}

/// DescribeInstances reads filter values as every Describe does (EC2's
/// wildcards `*` and `?`, anything else literal), a filter passing by any
/// one of its values: tags, keys, zones, types, images and network facts.
#[tokio::test]
async fn instance_filters_take_the_same_wildcards_as_every_describe() {
    let cloud = Cloud::start().await.unwrap();
    let _agent = cloud.add_agent("a", "az1", 32, 32768, 500).await.unwrap();
    let image = cloud.register_test_image().await.unwrap();
    let alice = account(&cloud, "alice").await;
    let v = "Version=2016-11-15";
    let mut ids = Vec::new();
    for (name, team) in [("web-1", "red"), ("db-1", "blue")] {
        let run = format!(
            "Action=RunInstances&{v}&ImageId={}&InstanceType=t3.nano&MinCount=1&MaxCount=1\
             &TagSpecification.1.ResourceType=instance&TagSpecification.1.Tag.1.Key=Name&TagSpecification.1.Tag.1.Value={name}\
             &TagSpecification.1.Tag.2.Key=team&TagSpecification.1.Tag.2.Value={team}",
            image.image_id
        );
        let (status, xml) = ec2(&cloud, &alice, &run).await;
        assert_eq!(status, 200, "{xml}");
        ids.push(between(&xml, "instanceId")[0].to_string());
    }
    let found = |filters: &str| {
        let form = format!("Action=DescribeInstances&{v}{filters}");
        let (cloud, alice) = (&cloud, &alice);
        async move {
            let (status, xml) = ec2(cloud, alice, &form).await;
            assert_eq!(status, 200, "{form}: {xml}");
            let mut got: Vec<String> = between(&xml, "instanceId").into_iter().map(str::to_string).collect();
            got.sort();
            got
        }
    };
    let mut both = ids.clone();
    both.sort();
    let web = vec![ids[0].clone()];
    for (filters, want) in [
        ("&Filter.1.Name=tag:team&Filter.1.Value.1=r*", &web),
        ("&Filter.1.Name=tag:team&Filter.1.Value.1=r?d", &web),
        ("&Filter.1.Name=tag:team&Filter.1.Value.1=nope&Filter.1.Value.2=*e*", &both),
        ("&Filter.1.Name=tag:Name&Filter.1.Value.1=*-1", &both),
        ("&Filter.1.Name=tag-key&Filter.1.Value.1=te?m", &both),
        ("&Filter.1.Name=tag-key&Filter.1.Value.1=nope&Filter.1.Value.2=Name", &both),
        ("&Filter.1.Name=instance-type&Filter.1.Value.1=t3.n*", &both),
        ("&Filter.1.Name=availability-zone&Filter.1.Value.1=az?", &both),
        ("&Filter.1.Name=image-id&Filter.1.Value.1=ami-*", &both),
        ("&Filter.1.Name=private-ip-address&Filter.1.Value.1=172.31.*", &both),
        ("&Filter.1.Name=tag:Name&Filter.1.Value.1=web*&Filter.2.Name=tag:team&Filter.2.Value.1=red", &web),
    ] {
        assert_eq!(&found(filters).await, want, "{filters}");
    }
    // Only * and ? are wildcards: SQL's own are literal.
    for filters in [
        "&Filter.1.Name=tag:team&Filter.1.Value.1=r%",
        "&Filter.1.Name=tag:team&Filter.1.Value.1=r_d",
        "&Filter.1.Name=tag-key&Filter.1.Value.1=%",
        "&Filter.1.Name=tag:Name&Filter.1.Value.1=web-1&Filter.2.Name=tag:team&Filter.2.Value.1=blue",
    ] {
        assert!(found(filters).await.is_empty(), "{filters}");
    }
}
