//! libvirt backend (owned by the backend work).
