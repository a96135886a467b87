//! Authentication for the EC2 Query API front door: AWS Signature Version 4
//! verification ([`sigv4`]) and sealed storage of access-key secrets
//! ([`secrets`]); the cluster's certificate authority ([`ca`]).

pub mod ca;
pub mod secrets;
pub mod sigv4;
