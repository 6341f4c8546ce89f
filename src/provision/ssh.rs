//! russh client (owned by the ssh work).
