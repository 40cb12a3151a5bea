"""OpenAI wire format: request bodies (requests), response and stream-chunk bodies (responses), the error body
(api_error) and the mapping from a request to SamplingParams (sampling)."""
