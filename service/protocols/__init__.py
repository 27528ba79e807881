"""The wire protocols: adapters that parse, validate and format, over the one core (service/core.py). A new
endpoint is a new adapter here and a line in ROUTES, never a new path to the batcher."""

from service.http.front import Route
from service.protocols import feedback, rest, v2

ROUTES = {
    "/predict": Route("predict", ("POST",), rest.predict),
    "/predict_array": Route("predict_array", ("POST",), rest.predict_array),
    "/model_info": Route("model_info", ("GET", "POST"), rest.model_info),
    "/feedback": Route("feedback", ("POST",), feedback.feedback),
    "/feedback/stats": Route("feedback", ("GET",), feedback.stats),
    "/livez": Route("health", ("GET", "HEAD"), rest.livez, protected=False),
    "/healthz": Route("health", ("GET", "HEAD"), rest.livez, protected=False),
    "/readyz": Route("health", ("GET", "HEAD"), rest.readyz, protected=False),
    "/ui": Route("ui", ("GET", "HEAD"), rest.ui, protected=False),
    "/": Route("bentoml", ("GET", "HEAD"), rest.api_page, protected=False),
    "/v2": v2.ROUTE,
    "/v2/*": v2.ROUTE,  # every path under /v2: the adapter parses them
}
