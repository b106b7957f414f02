"""Runs inside Triton's Python backend stub, beside PyTriton 0.7's proxy `model.py`, which imports
it (triton_patch.py ships both files with every model rank 0 binds). It adds what PyTriton lacks:

1. One request's own error. A response holding the output ERROR_OUTPUT becomes that request's
   Triton error (INVALID_ARG: HTTP 400, or the code named by ERROR_CODE_OUTPUT: UNAVAILABLE, HTTP 503,
   for a full queue or a passed deadline, as Triton's own queue says), so a bad request that Triton's
   dynamic batcher put into one call with good ones fails alone (PyTriton answers a whole call with one error).
2. Cancellation. Every request of a decoupled (streaming) model carries a key in its parameters
   (KEY_PARAMETER). When Triton says its client has gone (gRPC cancel, closed HTTP stream), the
   key goes to rank 0 as one datagram on the socket named by $FT_RUNNER_CANCEL_SOCKET, the client
   gets a final CANCELLED response, and what rank 0 still sends for it is dropped.
3. Deadlines. Triton keeps a request's `timeout` parameter (microseconds) out of the parameters
   PyTriton hands on; it is copied into them as TIMEOUT_PARAMETER.
4. Calls of a non-decoupled model that overlap. PyTriton's `execute` for one waits for its call's
   responses, and Triton gives a model instance one call at a time, so every other request waited in
   Triton's queue until the slowest row of the running call was done (an async callable on rank 0
   does not change that; more instances would only allow as many overlapping calls, each instance a
   stub process that slows Triton's start and stop). Here `execute` returns at
   once, as for a decoupled model, and each request's one response goes through its response
   sender with the final mark when rank 0 answers (Triton's Python backend allows that for a
   non-decoupled model: one response per request, `execute` returning None). Triton then hands the
   instance its next call at once; the text and token models' callables are coroutines, so rank 0
   runs their calls side by side too, each request joining the engine's running batch.

Only the standard library and Triton's pb_utils may be used here: this is the stub's process.
"""

import asyncio
import itertools
import os
import socket

ERROR_OUTPUT = "error"
ERROR_CODE_OUTPUT = "error_code"  # optional: the name of a pb_utils.TritonError code
KEY_PARAMETER = "ft_runner_key"
TIMEOUT_PARAMETER = "ft_runner_timeout_us"
SOCKET_ENV = "FT_RUNNER_CANCEL_SOCKET"


def install(proxy: dict) -> None:
    """Patch PyTriton's proxy model through its module globals `proxy`."""
    pb_utils = proxy["pb_utils"]
    flags = proxy["PyTritonResponseFlags"]
    wrap_response = proxy["_wrap_response"]
    wrap_request = proxy["TritonRequestsServer"]._wrap_request
    counter = itertools.count()
    keys = {}  # id(Triton request) -> its key, from its arrival to its stream's start

    def _wrap_response(response, requested_output_names, model_outputs_dict):
        if response.data is not None and ERROR_OUTPUT in response.data:
            message = response.data[ERROR_OUTPUT].reshape(-1)[0].decode("utf-8", "replace")
            code = pb_utils.TritonError.INVALID_ARG
            if ERROR_CODE_OUTPUT in response.data:
                code = getattr(pb_utils.TritonError, response.data[ERROR_CODE_OUTPUT].reshape(-1)[0].decode(), code)
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
        return wrap_response(response, requested_output_names, model_outputs_dict)

    def _wrap_request(self, triton_request, inputs, span=None):
        request = wrap_request(self, triton_request, inputs, span)
        extra = {}
        if triton_request.timeout():
            extra[TIMEOUT_PARAMETER] = int(triton_request.timeout())
        if self._model_config.get("model_transaction_policy", {}).get("decoupled", False):
            extra[KEY_PARAMETER] = keys.setdefault(id(triton_request), f"{os.getpid()}-{next(counter)}")
        if extra:
            request.parameters = dict(request.parameters or {}, **extra)
        return request

    async def handle_responses(self, scope, responses_queue, responses_future):
        """PyTriton's DecoupledResponsesHandler.handle_responses, plus cancellation; with `one_response`
        (a non-decoupled model) each request's one response goes with the final mark, once the call ends."""
        one_response = getattr(self, "one_response", False)
        held = None  # one_response: the payload of the call's responses, until its end comes
        requests_id = scope["requests_id"]
        loop = asyncio.get_running_loop()
        triton_requests = self._requests_map[requests_id]
        senders = [request.get_response_sender() for request in triton_requests]
        request_keys = [keys.pop(id(request), None) for request in triton_requests]

        async def send(responses, final: bool):
            mark = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
            # one_response: a request whose client has gone may refuse its response; the others still get theirs
            await asyncio.gather(*(loop.run_in_executor(None, sender.send, response, mark)
                                   for sender, response in zip(senders, responses)), return_exceptions=one_response)

        def errors(message: str, code=None):
            error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
            return [pb_utils.InferenceResponse(error=error) for _ in senders]

        open_ = True  # the clients still listen
        eos = False
        try:
            while not eos:
                mark, payload = await responses_queue.get()
                eos, error = mark & flags.EOS, mark & flags.ERROR
                try:
                    # a stream's client leaving stops its generation; a non-decoupled call may hold other
                    # clients' requests, and rank 0 knows no key for them: each is answered as it ends
                    if open_ and not one_response and any(sender.is_cancelled() for sender in senders):
                        open_ = False
                        _report_cancelled(request_keys)
                        await send(errors("cancelled by the client", pb_utils.TritonError.CANCELLED), final=True)
                    if not open_:
                        continue
                    if error:
                        responses = errors(payload.decode("utf-8"))
                    elif one_response and not eos:
                        held, payload = payload, None  # freed once sent
                        continue
                    else:
                        responses = [
                            _wrap_response(response, request.requested_output_names(), self._model_outputs_dict)
                            for request, response in zip(
                                triton_requests, self._serializer_deserializer.deserialize_responses(
                                    held if one_response and held is not None else payload))
                        ]
                    if not responses:  # an end without responses: nothing, or (one_response) an error
                        responses = errors("the model sent no response") if one_response else [None] * len(senders)
                    await send(responses, final=bool(eos))
                finally:
                    if not error and payload is not None:
                        self._serializer_deserializer.free_responses_resources(payload)
                    responses_queue.task_done()
        except asyncio.CancelledError:
            if open_:
                await send(errors("Cancelled responses handler"), final=True)
        finally:
            if held is not None:
                self._serializer_deserializer.free_responses_resources(held)
            self._requests_map.pop(requests_id, None)
            responses_future.set_result(None)

    class SenderResponsesHandler(proxy["DecoupledResponsesHandler"]):
        """A non-decoupled model's responses, through the requests' response senders (4. above)."""

        one_response = True

    model = proxy["TritonPythonModel"]
    initialize = model.initialize

    def _initialize(self, args):
        initialize(self, args)  # picks proxy["BatchResponsesHandler"] for a non-decoupled model
        # `execute` returns at once (None) as for a decoupled model; SenderResponsesHandler answers later
        self._decoupled_model = True

    proxy["BatchResponsesHandler"] = SenderResponsesHandler
    model.initialize = _initialize

    proxy["_wrap_response"] = _wrap_response
    proxy["TritonRequestsServer"]._wrap_request = _wrap_request
    proxy["DecoupledResponsesHandler"].handle_responses = handle_responses


def _report_cancelled(request_keys) -> None:
    path = os.environ.get(SOCKET_ENV)
    if not path:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        for key in filter(None, request_keys):
            try:
                sock.sendto(key.encode("utf-8"), path)
            except OSError:
                pass  # rank 0 is gone or stopping: nothing to free
