//! Workspace-level tests live in `tests/tests/`: the golden fixtures from Hugging Face
//! `transformers` and process-level tests of the `expertmesh` binary.
