//! The expertmesh coordinator: cluster membership, expert placement and, later, the raft
//! group that replicates them. Nothing lives here yet; see `../shared/DESIGN.md` §5.
