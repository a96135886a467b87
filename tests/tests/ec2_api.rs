//! The EC2 Query front door over the real control plane, with requests
//! signed by the `aws-sigv4` crate (the AWS SDK's own signer).

use nimbus_tests::Cloud;
use serde_json::json;
use std::time::{Duration, SystemTime};

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

fn between<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    xml.match_indices(&open)
        .filter_map(|(i, _)| {
            let rest = &xml[i + open.len()..];
            rest.find(&close).map(|j| &rest[..j])
        })
        .collect()
}

fn error_code(xml: &str) -> &str {
    between(xml, "Code").first().copied().unwrap_or("")
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
    assert_eq!(status, 400, "a DryRun of a bad request answers the real error: {xml}");

    let (status, xml) = ec2(&cloud, &alice, &run).await;
    assert_eq!(status, 200, "{xml}");
    let ids: Vec<String> = between(&xml, "instanceId").into_iter().map(str::to_string).collect();
    assert_eq!(ids.len(), 2);
    assert_eq!(between(&xml, "name"), vec!["pending", "pending"]);
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM instances WHERE account_id <> '000000000000'").fetch_one(cloud.db()).await.unwrap();
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
        (format!("Action=DescribeImages&{v}&ImageId.1=ami-00000000000000000"), 400, "InvalidAMIID.NotFound"),
        (format!("Action=RunInstances&{v}&ImageId=ami-bad&MinCount=1&MaxCount=1"), 400, "InvalidAMIID.Malformed"),
        (format!("Action=RunInstances&{v}&ImageId={}&MinCount=1", image.image_id), 400, "MissingParameter"),
        (format!("Action=RunInstances&{v}&ImageId={}&MinCount=0&MaxCount=0&InstanceType=t3.nano", image.image_id), 400, "InvalidParameterValue"),
        (format!("Action=RunInstances&{v}&ImageId={}&MinCount=-1&MaxCount=1&InstanceType=t3.nano", image.image_id), 400, "InvalidParameterValue"),
        (format!("Action=RunInstances&{v}&ImageId={}&MinCount=1&MaxCount=1000000&InstanceType=t3.nano", image.image_id), 400, "InvalidParameterValue"),
        (format!("Action=RunInstances&{v}&ImageId={}&MinCount=1&MaxCount=1&InstanceType=t3.nano&UserData={}", image.image_id, "QUFB".repeat(6000)), 400, "InvalidParameterValue"),
        (format!("Action=RunInstances&{v}&ImageId={}&MinCount=2&MaxCount=2&InstanceType=t3.nano", image.image_id), 500, "InsufficientInstanceCapacity"),
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
    assert!(resp.status().is_client_error());
    let (status, _) = ec2(&cloud, &keys, form).await;
    assert_eq!(status, 200);
}
