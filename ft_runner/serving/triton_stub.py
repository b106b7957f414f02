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
        """PyTriton's DecoupledResponsesHandler.handle_responses, plus cancellation."""
        requests_id = scope["requests_id"]
        loop = asyncio.get_running_loop()
        triton_requests = self._requests_map[requests_id]
        senders = [request.get_response_sender() for request in triton_requests]
        request_keys = [keys.pop(id(request), None) for request in triton_requests]

        async def send(responses, final: bool):
            mark = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
            await asyncio.gather(*(loop.run_in_executor(None, sender.send, response, mark)
                                   for sender, response in zip(senders, responses)))

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
                    if open_ and any(sender.is_cancelled() for sender in senders):
                        open_ = False
                        _report_cancelled(request_keys)
                        await send(errors("cancelled by the client", pb_utils.TritonError.CANCELLED), final=True)
                    if not open_:
                        continue
                    if error:
                        responses = errors(payload.decode("utf-8"))
                    else:
                        responses = [
                            _wrap_response(response, request.requested_output_names(), self._model_outputs_dict)
                            for request, response in zip(
                                triton_requests, self._serializer_deserializer.deserialize_responses(payload))
                        ]
                    await send(responses or [None] * len(senders), final=bool(eos))
                finally:
                    if not error:
                        self._serializer_deserializer.free_responses_resources(payload)
                    responses_queue.task_done()
        except asyncio.CancelledError:
            if open_:
                await send(errors("Cancelled responses handler"), final=True)
        finally:
            self._requests_map.pop(requests_id, None)
            responses_future.set_result(None)

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
