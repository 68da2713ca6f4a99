//! Real redis-server / redis-sentinel processes for tests (filled in with the Redis broker).
