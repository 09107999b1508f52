"""HTTP routers, one per resource, mounted under `/v1` by `service.app`. Handlers are thin: they call the
keyword-only functions of the service modules through the dependencies of `service.deps`."""
