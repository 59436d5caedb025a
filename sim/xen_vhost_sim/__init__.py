"""The simulated Xen host: answers the daemon's ioctls with Xen's numbers and payload bytes."""
