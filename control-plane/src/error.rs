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
            InsufficientInstanceCapacity(_) => "InsufficientInstanceCapacity",
            IdempotentParameterMismatch(_) => "IdempotentParameterMismatch",
            IncorrectInstanceState(_) => "IncorrectInstanceState",
            KeyPairNotFound(_) => "InvalidKeyPair.NotFound",
            KeyPairDuplicate(_) => "InvalidKeyPair.Duplicate",
            InvalidKeyFormat(_) => "InvalidKeyPair.Format",
            TagLimitExceeded(_) => "TagLimitExceeded",
            InstanceLimitExceeded(_) => "InstanceLimitExceeded",
            VcpuLimitExceeded(_) => "VcpuLimitExceeded",
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
            | AccountNotFound(_)
            | ImageNotFound(_)
            | ImageIdMalformed(_)
            | InstanceNotFound(_)
            | InstanceIdMalformed(_)
            | InstanceTypeNotFound(_)
            | RequestExpired(_)
            | IncompleteSignature(_)
            | HostNotFound(_)
            | InvalidAction(_) => StatusCode::BAD_REQUEST,
            DryRunOperation => StatusCode::PRECONDITION_FAILED,
            RequestTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            MissingAuthenticationToken(_) => StatusCode::UNAUTHORIZED,
            ImageAlreadyExists(_) | IdempotentParameterMismatch(_) | Conflict(_) | KeyPairDuplicate(_) | HostAlreadyRegistered(_) => {
                StatusCode::CONFLICT
            }
            AuthFailure(_) => StatusCode::UNAUTHORIZED,
            Unauthorized(_) => StatusCode::FORBIDDEN,
            RouteNotFound(_) => StatusCode::NOT_FOUND,
            // Throttling, as EC2 answers it: retry later.
            InsufficientInstanceCapacity(_) | RequestLimitExceeded(_) => StatusCode::SERVICE_UNAVAILABLE,
            Database(_) | Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The status of the EC2 Query front door: as REST, except that lack of
    /// capacity is a 500 (as EC2 answers it) and conflicts are 400s.
    pub fn ec2_status(&self) -> StatusCode {
        use ServiceError::*;
        match self {
            InsufficientInstanceCapacity(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ImageAlreadyExists(_) | IdempotentParameterMismatch(_) | Conflict(_) | KeyPairDuplicate(_) => StatusCode::BAD_REQUEST,
            other => other.http_status(),
        }
    }

    /// The message shown to clients. Internal details stay in the logs.
    pub fn public_message(&self) -> String {
        match self {
            ServiceError::Database(_) | ServiceError::Internal(_) => {
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
            SignatureMismatch => ServiceError::AuthFailure(
                "The request signature we calculated does not match the signature you provided".into(),
            ),
            RequestExpired => ServiceError::RequestExpired("Request has expired".into()),
        }
    }
}
