//! The one error type of the service layer and its mapping to API errors.
//!
//! Every error has a stable code ([`ServiceError::code`], EC2's names where
//! EC2 has one) and a kind ([`ServiceError::kind`]: what went wrong, from
//! which each front door derives its status: `api::status` for REST,
//! `api::ec2::status` for the EC2 door). Nothing else in the control plane
//! decides an error code or status, and the service layer knows no HTTP.

/// What kind of failure an error is; each front door maps it to a status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is wrong (bad or missing parameter, unknown resource,
    /// a limit reached, a state that does not allow it).
    Invalid,
    /// The request conflicts with what exists (a duplicate, a resource in
    /// use, a concurrent change).
    Conflict,
    /// No credentials, or credentials that do not verify.
    Unauthenticated,
    /// Authenticated, but not allowed.
    Forbidden,
    /// No such route.
    NoRoute,
    /// The body is larger than the route accepts.
    TooLarge,
    /// A DryRun that would have succeeded.
    DryRun,
    /// Not enough capacity now (instances, addresses): retrying later can succeed.
    Capacity,
    /// Too many requests: retry later.
    Throttled,
    /// A fault of the control plane or what it depends on.
    Internal,
}

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
    /// A fault with no typed error of its own (a broken invariant).
    #[error("internal error: {0}")]
    Internal(String),
    /// A fault of a part the control plane uses, its source kept.
    #[error("internal error: {what}")]
    InternalSource {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl ServiceError {
    /// A fault of a part the control plane uses, keeping its error as the source.
    pub fn internal(what: impl Into<String>, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> ServiceError {
        ServiceError::InternalSource { what: what.into(), source: source.into() }
    }

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
            Database(e) if crate::db::is_constraint_violation(e) => "Conflict",
            Database(_) | Internal(_) | InternalSource { .. } => "InternalError",
        }
    }

    /// What kind of failure this is. Only a real fault of the control plane
    /// is `Internal` (clients retry those); a constraint violation nothing
    /// caught is a conflict with a concurrent change, not a fault.
    pub fn kind(&self) -> ErrorKind {
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
            | UnsupportedOperation(_) => ErrorKind::Invalid,
            DryRunOperation => ErrorKind::DryRun,
            RequestTooLarge(_) => ErrorKind::TooLarge,
            MissingAuthenticationToken(_) => ErrorKind::Unauthenticated,
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
            | AddressInUse(_) => ErrorKind::Conflict,
            AuthFailure(_) => ErrorKind::Unauthenticated,
            Unauthorized(_) => ErrorKind::Forbidden,
            RouteNotFound(_) => ErrorKind::NoRoute,
            InsufficientInstanceCapacity(_) | InsufficientAddressCapacity(_) => ErrorKind::Capacity,
            RequestLimitExceeded(_) => ErrorKind::Throttled,
            Database(e) if crate::db::is_constraint_violation(e) => ErrorKind::Conflict,
            ImageStore(crate::image_store::StoreError::Io { .. }) | Database(_) | Internal(_) | InternalSource { .. } => {
                ErrorKind::Internal
            }
            ImageStore(crate::image_store::StoreError::TooLarge(_)) => ErrorKind::TooLarge,
            ImageStore(_) => ErrorKind::Invalid,
        }
    }

    /// The error and its sources, one after another (for the logs).
    pub fn report(&self) -> String {
        let mut out = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(e) = source {
            out.push_str(": ");
            out.push_str(&e.to_string());
            source = e.source();
        }
        out
    }

    /// The message shown to clients. Internal details stay in the logs.
    pub fn public_message(&self) -> String {
        match self {
            ServiceError::Database(e) if crate::db::is_constraint_violation(e) => {
                "The request conflicts with a concurrent change; retry it".to_string()
            }
            ServiceError::Database(_)
            | ServiceError::Internal(_)
            | ServiceError::InternalSource { .. }
            | ServiceError::ImageStore(crate::image_store::StoreError::Io { .. }) => {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    /// A PostgreSQL error with a SQLSTATE, as sqlx hands one over.
    #[derive(Debug)]
    struct Pg(&'static str);

    impl std::fmt::Display for Pg {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "SQLSTATE {}", self.0)
        }
    }
    impl std::error::Error for Pg {}
    impl sqlx::error::DatabaseError for Pg {
        fn message(&self) -> &str {
            "test"
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn db(code: &'static str) -> ServiceError {
        ServiceError::Database(sqlx::Error::Database(Box::new(Pg(code))))
    }

    #[test]
    fn a_constraint_violation_nothing_caught_is_a_conflict_not_a_fault() {
        for code in ["23505", "23503", "23514", "23P01"] {
            let e = db(code);
            assert_eq!((e.kind(), e.code()), (ErrorKind::Conflict, "Conflict"), "{code}");
            assert!(!e.public_message().contains("internal"), "{code}");
        }
        let e = db("XX000");
        assert_eq!((e.kind(), e.code()), (ErrorKind::Internal, "InternalError"));
    }

    #[test]
    fn an_internal_error_keeps_its_source_for_the_logs_only() {
        let e = ServiceError::internal("sealing a secret", std::io::Error::other("disk on fire"));
        assert_eq!(e.kind(), ErrorKind::Internal);
        assert_eq!(e.report(), "internal error: sealing a secret: disk on fire");
        assert!(!e.public_message().contains("fire"));
    }
}
