//! CUDA support for tensorstream (pinned staging ring, streams, device arena).
