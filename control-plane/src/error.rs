//! The one error type of the service layer and its mapping to API errors.
//!
//! Every front door turns a [`ServiceError`] into its wire form through
//! [`ServiceError::code`] and [`ServiceError::http_status`]; nothing else in
//! the control plane decides an error code or status.

use axum::http::StatusCode;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    InvalidParameterValue(String),
    #[error("The request must contain the parameter {0}")]
    MissingParameter(String),
    #[error("{0}")]
    MalformedRequest(String),
    #[error("{0}")]
    RequestTooLarge(String),
    #[error("{0}")]
    InvalidParameterCombination(String),
    #[error("The image id '{0}' does not exist")]
    ImageNotFound(String),
    #[error("Invalid id: \"{0}\" (expecting \"ami-...\")")]
    ImageIdMalformed(String),
    #[error("The instance ID '{0}' does not exist")]
    InstanceNotFound(String),
    #[error("Invalid id: \"{0}\" (expecting \"i-...\")")]
    InstanceIdMalformed(String),
    #[error("Invalid value '{0}' for InstanceType: no such instance type")]
    InstanceTypeNotFound(String),
    #[error("An image named '{0}' already exists")]
    ImageAlreadyExists(String),
    #[error("The image id '{0}' is not available: {1}")]
    ImageUnavailable(String, String),
    #[error("{0}")]
    ImageNameMalformed(String),
    #[error("{0}")]
    InvalidBlockDeviceMapping(String),
    #[error("The image '{0}' is not being made (it is {1})")]
    ImageNotPending(String, String),
    #[error(transparent)]
    ImageStore(#[from] crate::image_store::StoreError),
    #[error("The root disk {0}")]
    ImageNotStandalone(String),
    #[error("There is not enough capacity to fulfil your request: {0}")]
    InsufficientInstanceCapacity(String),
    #[error("{0}")]
    IncorrectInstanceState(String),
    #[error("The key pair '{0}' does not exist")]
    KeyPairNotFound(String),
    #[error("The keypair '{0}' already exists")]
    KeyPairDuplicate(String),
    #[error("{0}")]
    InvalidKeyFormat(String),
    #[error("{0}")]
    TagLimitExceeded(String),
    #[error("{0}")]
    InstanceLimitExceeded(String),
    #[error("{0}")]
    VcpuLimitExceeded(String),
    #[error("{0}")]
    ResourceLimitExceeded(String),
    #[error("{0}")]
    RequestLimitExceeded(String),
    #[error("The account '{0}' does not exist")]
    AccountNotFound(String),
    #[error("Client token '{0}' was already used with different parameters")]
    IdempotentParameterMismatch(String),
    #[error("{0}")]
    AuthFailure(String),
    #[error("{0}")]
    RequestExpired(String),
    #[error("{0}")]
    IncompleteSignature(String),
    #[error("{0}")]
    MissingAuthenticationToken(String),
    #[error("The action {0} is not valid for this web service")]
    InvalidAction(String),
    #[error("Request would have succeeded, but DryRun flag is set")]
    DryRunOperation,
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Conflict(String),
    #[error("A host named '{0}' is registered: re-registering it needs its current credential, or the operator's reset (nimbus admin reset-host {0})")]
    HostAlreadyRegistered(String),
    #[error("The host '{0}' does not exist")]
    HostNotFound(String),
    #[error("No route for {0}")]
    RouteNotFound(String),
    #[error("The vpc ID '{0}' does not exist")]
    VpcNotFound(String),
    #[error("Invalid id: \"{0}\" (expecting \"vpc-...\")")]
    VpcIdMalformed(String),
    #[error("{0}")]
    VpcRange(String),
    #[error("{0}")]
    VpcLimitExceeded(String),
    #[error("The subnet ID '{0}' does not exist")]
    SubnetNotFound(String),
    #[error("Invalid id: \"{0}\" (expecting \"subnet-...\")")]
    SubnetIdMalformed(String),
    #[error("{0}")]
    SubnetRange(String),
    #[error("{0}")]
    SubnetConflict(String),
    #[error("{0}")]
    SubnetLimitExceeded(String),
    #[error("{0}")]
    GroupNotFound(String),
    #[error("Invalid id: \"{0}\" (expecting \"sg-...\")")]
    GroupIdMalformed(String),
    #[error("The security group '{0}' already exists for VPC '{1}'")]
    GroupDuplicate(String, String),
    #[error("{0}")]
    GroupReserved(String),
    #[error("{0}")]
    SecurityGroupLimitExceeded(String),
    #[error("{0}")]
    SecurityGroupsPerInterfaceLimitExceeded(String),
    #[error("{0}")]
    RulesPerSecurityGroupLimitExceeded(String),
    #[error("{0}")]
    CannotDelete(String),
    #[error("{0}")]
    DependencyViolation(String),
    #[error("{0}")]
    PermissionDuplicate(String),
    #[error("{0}")]
    PermissionNotFound(String),
    #[error("{0}")]
    PermissionMalformed(String),
    #[error("The network interface ID '{0}' does not exist")]
    NetworkInterfaceNotFound(String),
    #[error("Invalid id: \"{0}\" (expecting \"eni-...\")")]
    NetworkInterfaceIdMalformed(String),
    #[error("The security group rule ID '{0}' does not exist")]
    SecurityGroupRuleNotFound(String),
    #[error("Address '{0}' not found.")]
    AddressNotFound(String),
    #[error("The allocation ID '{0}' does not exist")]
    AllocationNotFound(String),
    #[error("The association ID '{0}' does not exist")]
    AssociationNotFound(String),
    #[error("{0}")]
    AlreadyAssociated(String),
    #[error("{0}")]
    AddressInUse(String),
    #[error("{0}")]
    AddressLimitExceeded(String),
    #[error("{0}")]
    InsufficientFreeAddressesInSubnet(String),
    #[error("{0}")]
    InsufficientAddressCapacity(String),
    #[error("{0}")]
    OperationNotPermitted(String),
    #[error("{0}")]
    UnsupportedOperation(String),
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServiceError {
    /// The stable error code clients match on (EC2's names where EC2 has one).
    pub fn code(&self) -> &'static str {
        use ServiceError::*;
        match self {
            InvalidParameterValue(_) => "InvalidParameterValue",
            MissingParameter(_) => "MissingParameter",
            MalformedRequest(_) => "MalformedRequest",
            RequestTooLarge(_) => "RequestEntityTooLarge",
            InvalidParameterCombination(_) => "InvalidParameterCombination",
            ImageNotFound(_) => "InvalidAMIID.NotFound",
            ImageIdMalformed(_) => "InvalidAMIID.Malformed",
            InstanceNotFound(_) => "InvalidInstanceID.NotFound",
            InstanceIdMalformed(_) => "InvalidInstanceID.Malformed",
            InstanceTypeNotFound(_) => "InvalidParameterValue",
            ImageAlreadyExists(_) => "InvalidAMIName.Duplicate",
            ImageUnavailable(..) => "InvalidAMIID.Unavailable",
            ImageNameMalformed(_) => "InvalidAMIName.Malformed",
            InvalidBlockDeviceMapping(_) => "InvalidBlockDeviceMapping",
            ImageNotPending(..) => "IncorrectState",
            ImageStore(crate::image_store::StoreError::Io { .. }) => "InternalError",
            ImageStore(crate::image_store::StoreError::TooLarge(_)) => "RequestEntityTooLarge",
            ImageStore(_) => "InvalidParameterValue",
            ImageNotStandalone(_) => "InvalidParameterValue",
            InsufficientInstanceCapacity(_) => "InsufficientInstanceCapacity",
            IdempotentParameterMismatch(_) => "IdempotentParameterMismatch",
            IncorrectInstanceState(_) => "IncorrectInstanceState",
            KeyPairNotFound(_) => "InvalidKeyPair.NotFound",
            KeyPairDuplicate(_) => "InvalidKeyPair.Duplicate",
            InvalidKeyFormat(_) => "InvalidKeyPair.Format",
            TagLimitExceeded(_) => "TagLimitExceeded",
            InstanceLimitExceeded(_) => "InstanceLimitExceeded",
            VcpuLimitExceeded(_) => "VcpuLimitExceeded",
            ResourceLimitExceeded(_) => "ResourceLimitExceeded",
            RequestLimitExceeded(_) => "RequestLimitExceeded",
            AccountNotFound(_) => "InvalidAccountID.NotFound",
            AuthFailure(_) => "AuthFailure",
            RequestExpired(_) => "RequestExpired",
            IncompleteSignature(_) => "IncompleteSignature",
            MissingAuthenticationToken(_) => "MissingAuthenticationToken",
            InvalidAction(_) => "InvalidAction",
            DryRunOperation => "DryRunOperation",
            Unauthorized(_) => "UnauthorizedOperation",
            Conflict(_) => "Conflict",
            HostAlreadyRegistered(_) => "HostAlreadyRegistered",
            HostNotFound(_) => "InvalidHostID.NotFound",
            RouteNotFound(_) => "NotFound",
            VpcNotFound(_) => "InvalidVpcID.NotFound",
            VpcIdMalformed(_) => "InvalidVpcID.Malformed",
            VpcRange(_) => "InvalidVpc.Range",
            VpcLimitExceeded(_) => "VpcLimitExceeded",
            SubnetNotFound(_) => "InvalidSubnetID.NotFound",
            SubnetIdMalformed(_) => "InvalidSubnetID.Malformed",
            SubnetRange(_) => "InvalidSubnet.Range",
            SubnetConflict(_) => "InvalidSubnet.Conflict",
            SubnetLimitExceeded(_) => "SubnetLimitExceeded",
            GroupNotFound(_) => "InvalidGroup.NotFound",
            GroupIdMalformed(_) => "InvalidGroupId.Malformed",
            GroupDuplicate(..) => "InvalidGroup.Duplicate",
            GroupReserved(_) => "InvalidGroup.Reserved",
            SecurityGroupLimitExceeded(_) => "SecurityGroupLimitExceeded",
            SecurityGroupsPerInterfaceLimitExceeded(_) => "SecurityGroupsPerInterfaceLimitExceeded",
            RulesPerSecurityGroupLimitExceeded(_) => "RulesPerSecurityGroupLimitExceeded",
            CannotDelete(_) => "CannotDelete",
            DependencyViolation(_) => "DependencyViolation",
            PermissionDuplicate(_) => "InvalidPermission.Duplicate",
            PermissionNotFound(_) => "InvalidPermission.NotFound",
            PermissionMalformed(_) => "InvalidPermission.Malformed",
            NetworkInterfaceNotFound(_) => "InvalidNetworkInterfaceID.NotFound",
            NetworkInterfaceIdMalformed(_) => "InvalidNetworkInterfaceID.Malformed",
            SecurityGroupRuleNotFound(_) => "InvalidSecurityGroupRuleId.NotFound",
            AddressNotFound(_) => "InvalidAddress.NotFound",
            AllocationNotFound(_) => "InvalidAllocationID.NotFound",
            AssociationNotFound(_) => "InvalidAssociationID.NotFound",
            AlreadyAssociated(_) => "Resource.AlreadyAssociated",
            AddressInUse(_) => "InvalidIPAddress.InUse",
            AddressLimitExceeded(_) => "AddressLimitExceeded",
            InsufficientFreeAddressesInSubnet(_) => "InsufficientFreeAddressesInSubnet",
            InsufficientAddressCapacity(_) => "InsufficientAddressCapacity",
            OperationNotPermitted(_) => "OperationNotPermitted",
            UnsupportedOperation(_) => "UnsupportedOperation",
            Database(_) | Internal(_) => "InternalError",
        }
    }

    /// The REST status. Client errors are 4xx; only a real server fault is 5xx
    /// (clients retry 5xx). Lack of capacity is 503: retrying later can succeed.
    pub fn http_status(&self) -> StatusCode {
        use ServiceError::*;
        match self {
            InvalidParameterValue(_)
            | MissingParameter(_)
            | MalformedRequest(_)
            | InvalidParameterCombination(_)
            | IncorrectInstanceState(_)
            | KeyPairNotFound(_)
            | InvalidKeyFormat(_)
            | TagLimitExceeded(_)
            | InstanceLimitExceeded(_)
            | VcpuLimitExceeded(_)
            | ResourceLimitExceeded(_)
            | AccountNotFound(_)
            | ImageNotFound(_)
            | ImageIdMalformed(_)
            | ImageUnavailable(..)
            | ImageNameMalformed(_)
            | InvalidBlockDeviceMapping(_)
            | ImageNotStandalone(_)
            | InstanceNotFound(_)
            | InstanceIdMalformed(_)
            | InstanceTypeNotFound(_)
            | RequestExpired(_)
            | IncompleteSignature(_)
            | HostNotFound(_)
            | InvalidAction(_)
            | VpcNotFound(_)
            | VpcIdMalformed(_)
            | VpcRange(_)
            | VpcLimitExceeded(_)
            | SubnetNotFound(_)
            | SubnetIdMalformed(_)
            | SubnetRange(_)
            | SubnetLimitExceeded(_)
            | GroupNotFound(_)
            | GroupIdMalformed(_)
            | GroupReserved(_)
            | SecurityGroupLimitExceeded(_)
            | SecurityGroupsPerInterfaceLimitExceeded(_)
            | RulesPerSecurityGroupLimitExceeded(_)
            | CannotDelete(_)
            | PermissionNotFound(_)
            | PermissionMalformed(_)
            | NetworkInterfaceNotFound(_)
            | NetworkInterfaceIdMalformed(_)
            | SecurityGroupRuleNotFound(_)
            | AddressNotFound(_)
            | AllocationNotFound(_)
            | AssociationNotFound(_)
            | AddressLimitExceeded(_)
            | InsufficientFreeAddressesInSubnet(_)
            | OperationNotPermitted(_)
            | UnsupportedOperation(_) => StatusCode::BAD_REQUEST,
            DryRunOperation => StatusCode::PRECONDITION_FAILED,
            RequestTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            MissingAuthenticationToken(_) => StatusCode::UNAUTHORIZED,
            ImageAlreadyExists(_)
            | ImageNotPending(..)
            | IdempotentParameterMismatch(_)
            | Conflict(_)
            | KeyPairDuplicate(_)
            | HostAlreadyRegistered(_)
            | GroupDuplicate(..)
            | SubnetConflict(_)
            | DependencyViolation(_)
            | PermissionDuplicate(_)
            | AlreadyAssociated(_)
            | AddressInUse(_) => StatusCode::CONFLICT,
            AuthFailure(_) => StatusCode::UNAUTHORIZED,
            Unauthorized(_) => StatusCode::FORBIDDEN,
            RouteNotFound(_) => StatusCode::NOT_FOUND,
            // Throttling, as EC2 answers it: retry later.
            InsufficientInstanceCapacity(_) | InsufficientAddressCapacity(_) | RequestLimitExceeded(_) => StatusCode::SERVICE_UNAVAILABLE,
            ImageStore(crate::image_store::StoreError::Io { .. }) | Database(_) | Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ImageStore(crate::image_store::StoreError::TooLarge(_)) => StatusCode::PAYLOAD_TOO_LARGE,
            ImageStore(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// The status of the EC2 Query front door: as REST, except that lack of
    /// capacity is a 500 (as EC2 answers it) and conflicts are 400s.
    pub fn ec2_status(&self) -> StatusCode {
        use ServiceError::*;
        match self {
            InsufficientInstanceCapacity(_) | InsufficientAddressCapacity(_) => StatusCode::INTERNAL_SERVER_ERROR,
            other => match other.http_status() {
                StatusCode::CONFLICT => StatusCode::BAD_REQUEST,
                s => s,
            },
        }
    }

    /// The message shown to clients. Internal details stay in the logs.
    pub fn public_message(&self) -> String {
        match self {
            ServiceError::Database(_) | ServiceError::Internal(_) | ServiceError::ImageStore(crate::image_store::StoreError::Io { .. }) => {
                "An internal error occurred; the request id identifies it in the server's logs".to_string()
            }
            other => other.to_string(),
        }
    }
}

pub type Result<T, E = ServiceError> = std::result::Result<T, E>;

impl From<crate::auth::sigv4::SigV4Error> for ServiceError {
    fn from(e: crate::auth::sigv4::SigV4Error) -> Self {
        use crate::auth::sigv4::SigV4Error::*;
        match e {
            MissingAuth => ServiceError::MissingAuthenticationToken("Request is missing Authentication Token".into()),
            Malformed(why) => ServiceError::IncompleteSignature(format!("Incomplete or malformed signature: {why}")),
            UnknownAccessKey => ServiceError::AuthFailure("AWS was not able to validate the provided access credentials".into()),
            SignatureMismatch => {
                ServiceError::AuthFailure("The request signature we calculated does not match the signature you provided".into())
            }
            RequestExpired => ServiceError::RequestExpired("Request has expired".into()),
        }
    }
}
