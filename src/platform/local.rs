//! The local-process platform of `zeroscale dev`: TODO(dev issue).
