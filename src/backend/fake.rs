//! Recording backend double (owned by the backend work).
