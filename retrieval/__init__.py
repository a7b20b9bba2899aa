"""Search and query libraries with no Beam in them: the SQL engines over the embeddings
warehouse and the ScaNN index and searcher. Jobs and the search service call them."""
