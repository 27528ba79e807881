"""A BentoML endpoint that does nothing: the framework's own ceiling on this machine."""

import bentoml


@bentoml.service(name="noop", workers=2)
class Noop:
    @bentoml.api
    def noop(self) -> str:
        return "ok"
