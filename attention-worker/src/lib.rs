//! The expertmesh attention worker: embeddings, attention with the KV cache, norms, routers,
//! shared experts and dense layers, dispatching routed tokens to expert workers. The
//! single-process engine it will wrap lives in `expertmesh-model` today.
