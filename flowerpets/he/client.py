"""The client mod: key set-up on the node's side, encrypted updates, opened models.

Install it as an *app-level* mod (``ClientApp(mods=[CKKSClientMod()])``): the
key set-up messages have their own message type, which no handler serves, so
a handler-level mod would never see them. On an update's way out it comes
after privacy mods (clip, then noise), so it is listed *before* them (the
first mod listed is the outermost)::

    from flowerpets.dp import fixed_clipping_mod

    app = ClientApp(mods=[CKKSClientMod(), fixed_clipping_mod])  # clip, then encrypt
"""

from __future__ import annotations

import fnmatch
import logging
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from flowerpets.core import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
    is_sealed,
    reply_weight,
)
from flowerpets.exceptions import (
    CiphertextError,
    DecryptionError,
    InfeasibleParametersError,
    InvalidUpdateError,
    MissingKeyError,
    RequestRefusedError,
)
from flowerpets.he._primitives.ciphertexts import Header, encrypt_flat, wire_arrays
from flowerpets.he._primitives.keywrap import KEY_ID_BYTES, KeyBinding, TransportKeys, unwrap, wrap
from flowerpets.he._primitives.packing import Layout, peak
from flowerpets.he._primitives.params import (
    CKKSParameters,
    context_digest,
    load_public_context,
    load_secret_context,
    new_secret_context,
    public_context_bytes,
    secret_context_bytes,
)
from flowerpets.he._state import ClientKeys
from flowerpets.he.protocol import (
    CONFIG_COHORT_SIZE,
    CONFIG_ENCRYPT,
    CONFIG_KEY_ID,
    CONFIG_WEIGHT_KEY,
    HE_MESSAGE_TYPE,
    KEY_GENERATOR_CONFIG,
    KEY_ID,
    Stage,
)
from flowerpets.he.sealed import open_sealed

__all__ = ["CKKSClientMod", "ckks_mod"]

log = logging.getLogger(__name__)

CallNext = Callable[[Message, Context], Message]


def _config(msg: Message) -> ConfigRecord:
    body = msg.require_content()
    return body.get_typed("config", ConfigRecord) if "config" in body else ConfigRecord()


def _get(config: ConfigRecord, key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in config:
        raise RequestRefusedError(f"key set-up request lacks {key!r}")
    value = config[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise RequestRefusedError(f"key set-up request: {key!r} has the wrong type")
    return value


def _key_id(config: ConfigRecord) -> str:
    value = _get(config, "he.key-id", str)
    if not KEY_ID.fullmatch(value):
        raise RequestRefusedError(f"malformed key id {value!r}")
    return str(value)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class CKKSClientMod:
    """Encrypts what the node sends, opens what it receives, and takes part in key set-up.

    ``encrypt`` lists the arrays (exact names or globs, e.g. ``"fc*.weight"``)
    this node never sends in the clear: a reply (of any message type) holding
    any of them is encrypted under the run's CKKS key, or refused if the server
    did not ask for encryption or asks to leave one of them in the clear. The
    default, ``("*",)``, encrypts everything; anything narrower logs a warning.

    What it does, by message:

    * key set-up (message type ``he-keys``): answers the server's stages
      (:class:`~flowerpets.he.Stage`), keeping the X25519 transport key and the
      CKKS secret context in ``context.state``;
    * any request whose arrays are a sealed global model: decrypts it and
      divides by the total weight, so the handler sees plain arrays;
    * a reply to a request in which the server asked for encryption (the
      round's train request): multiplies the arrays the server lists by the update's
      weight (its ``num-examples`` metric, or what the server names), packs
      them into one flat vector, checks it fits the parameters' capacity, and
      encrypts it chunk by chunk; the other arrays go as they are.

    A node volunteers to generate the key with node config
    ``he-key-generator = True``.
    """

    def __init__(self, *, encrypt: Sequence[str] = ("*",)) -> None:
        if isinstance(encrypt, str) or not all(isinstance(p, str) and p for p in encrypt):
            raise ValueError(
                f"encrypt must be a sequence of non-empty names or patterns, got {encrypt!r}"
            )
        if not encrypt:
            raise ValueError("encrypt must name at least one array or pattern (default: '*')")
        self.encrypt = tuple(encrypt)
        if "*" not in self.encrypt:
            log.warning(
                "CKKSClientMod(encrypt=%r): arrays matching none of these may be sent to the "
                "server in the clear",
                self.encrypt,
            )
        self._stages: dict[str, Callable[[Message, Context, ClientKeys], RecordDict]] = {
            Stage.ADVERTISE: self._advertise,
            Stage.KEYGEN: self._keygen,
            Stage.SHARE: self._share,
            Stage.INSTALL: self._install,
        }

    def __repr__(self) -> str:
        return f"CKKSClientMod(encrypt={self.encrypt!r})"

    def __call__(self, msg: Message, context: Context, call_next: CallNext) -> Message:
        if msg.message_type == HE_MESSAGE_TYPE:
            return self._setup(msg, context)
        msg = self._open(msg, context)
        reply = call_next(msg, context)
        if reply.has_error or reply.content is None:
            return reply
        return self._seal_reply(msg, reply, context)

    # -- key set-up --------------------------------------------------------------------------
    def _setup(self, msg: Message, context: Context) -> Message:
        handler = self._stages.get(msg.metadata.stage)
        if handler is None:
            raise RequestRefusedError(f"unknown key set-up stage {msg.metadata.stage!r}")
        keys = ClientKeys.load(context.state)
        return msg.reply(handler(msg, context, keys))

    def _advertise(self, msg: Message, context: Context, keys: ClientKeys) -> RecordDict:
        if not keys.transport_private:
            transport = TransportKeys.generate()
            keys = keys.after(
                Stage.ADVERTISE,
                transport_private=transport.private,
                transport_public=transport.public,
            )
        else:
            keys = keys.after(Stage.ADVERTISE)
        keys.store(context.state)
        volunteer = context.node_config.get(KEY_GENERATOR_CONFIG, False) is True
        return RecordDict(
            {
                "config": ConfigRecord(
                    {
                        "he.public-key": keys.transport_public,
                        "he.volunteer": volunteer,
                        "he.key-id": keys.key_id,
                    }
                )
            }
        )

    def _wrap_for(
        self, context: Context, config: ConfigRecord, keys: ClientKeys, secret: bytes
    ) -> ConfigRecord:
        """Wrap ``secret`` for every recipient the request lists."""
        recipients = _get(config, "he.recipients", list)
        public_keys = _get(config, "he.recipient-keys", list)
        if len(recipients) != len(public_keys) or not all(
            isinstance(n, int) and not isinstance(n, bool) for n in recipients
        ):
            raise RequestRefusedError("recipients and their keys do not pair up")
        if context.node_id in recipients or len(set(recipients)) != len(recipients):
            raise RequestRefusedError("the recipients repeat a node or include this one")
        assert keys.params is not None
        digest = context_digest(public_context_bytes(load_secret_context(secret, keys.params)))
        wrapped = []
        for node, public in zip(recipients, public_keys, strict=True):
            binding = KeyBinding(
                run_id=context.run_id,
                sender=context.node_id,
                recipient=node,
                key_id=bytes.fromhex(keys.key_id),
                context_digest=digest,
            )
            try:
                wrapped.append(wrap(secret, public, binding))
            except ValueError as exc:
                raise RequestRefusedError(f"recipient {node}: {exc}") from None
        return ConfigRecord(
            {"he.key-id": keys.key_id, "he.recipients": list(recipients), "he.wrapped": wrapped}
        )

    def _keygen(self, msg: Message, context: Context, keys: ClientKeys) -> RecordDict:
        config = _config(msg)
        try:
            params = CKKSParameters.from_list(_get(config, "he.params", list))
        except ValueError as exc:  # insecure or malformed parameters are refused, never used
            raise RequestRefusedError(f"refusing CKKS parameters: {exc}") from None
        ckks = new_secret_context(params)
        keys = keys.after(
            Stage.KEYGEN,
            key_id=secrets.token_bytes(KEY_ID_BYTES).hex(),
            params=params,
            secret_context=secret_context_bytes(ckks),
        )
        out = self._wrap_for(context, config, keys, keys.secret_context)
        out["he.public-context"] = public_context_bytes(ckks)
        keys.store(context.state)
        return RecordDict({"config": out})

    def _share(self, msg: Message, context: Context, keys: ClientKeys) -> RecordDict:
        config = _config(msg)
        keys = keys.after(Stage.SHARE)
        if _key_id(config) != keys.key_id:
            raise RequestRefusedError(f"asked to share key {_key_id(config)}, holds {keys.key_id}")
        return RecordDict({"config": self._wrap_for(context, config, keys, keys.secret_context)})

    def _install(self, msg: Message, context: Context, keys: ClientKeys) -> RecordDict:
        config = _config(msg)
        key_id = _key_id(config)
        sender = _get(config, "he.sender", int)
        try:
            params = CKKSParameters.from_list(_get(config, "he.params", list))
            public = _get(config, "he.public-context", bytes)
            load_public_context(public, params)
        except ValueError as exc:
            raise RequestRefusedError(f"refusing the key's parameters: {exc}") from None
        if not keys.transport_private:
            raise RequestRefusedError("no transport key: this node was never asked to advertise")
        binding = KeyBinding(
            run_id=context.run_id,
            sender=sender,
            recipient=context.node_id,
            key_id=bytes.fromhex(key_id),
            context_digest=context_digest(public),
        )
        try:
            secret = unwrap(_get(config, "he.wrapped", bytes), keys.transport_private, binding)
            ckks = load_secret_context(secret, params)
        except (DecryptionError, MissingKeyError, ValueError) as exc:
            raise RequestRefusedError(f"refusing the wrapped key: {exc}") from None
        if public_context_bytes(ckks) != public:
            raise RequestRefusedError("the wrapped key does not belong to the announced parameters")
        keys = keys.after(Stage.INSTALL, key_id=key_id, params=params, secret_context=secret)
        keys.store(context.state)
        return RecordDict({"config": ConfigRecord({"he.key-id": key_id})})

    # -- models in, updates out ---------------------------------------------------------------
    def _open(self, msg: Message, context: Context) -> Message:
        if msg.content is None or "arrays" not in msg.content:
            return msg
        arrays = msg.content.get_typed("arrays", ArrayRecord)
        if not is_sealed(arrays):
            return msg
        try:
            opened = open_sealed(arrays, ClientKeys.load(context.state))
        except (MissingKeyError, CiphertextError) as exc:
            raise RequestRefusedError(f"cannot open the sealed model: {exc}") from None
        content = msg.content.copy()
        content["arrays"] = opened
        return Message(metadata=msg.metadata, content=content)

    def _seal_reply(self, request: Message, reply: Message, context: Context) -> Message:
        content = reply.content
        assert content is not None
        if "arrays" not in content:
            return reply
        arrays = content.get_typed("arrays", ArrayRecord)
        protected = [name for name in arrays if _matches(name, self.encrypt)]
        config = _config(request)
        if CONFIG_KEY_ID not in config:
            if protected:
                raise RequestRefusedError(
                    f"the server did not ask for encrypted updates (is HomomorphicAggregation "
                    f"installed?); refusing to send {protected[:5]} in the clear"
                )
            return reply
        keys = ClientKeys.load(context.state)
        key_id = _key_id(config)
        if keys.params is None or keys.key_id != key_id:
            raise RequestRefusedError(
                f"the round is under key {key_id}, this node holds {keys.key_id or 'none'}"
            )
        wanted = _get(config, CONFIG_ENCRYPT, list)
        clear = [name for name in protected if name not in wanted]
        if clear:
            raise RequestRefusedError(f"the server would take {clear[:5]} in the clear: refused")
        weight_key = _get(config, CONFIG_WEIGHT_KEY, str) or None
        cohort = _get(config, CONFIG_COHORT_SIZE, int)
        metrics = content.get_typed("metrics", MetricRecord) if "metrics" in content else None
        if metrics is None:
            raise InvalidUpdateError("the reply carries no metrics to weigh the update with")
        weight = reply_weight(metrics, weight_key)
        layout = Layout.of(arrays, wanted)
        flat = layout.pack({name: arrays[name] for name in layout.names}, float(weight))
        limit = keys.params.capacity / max(1, cohort)
        largest = peak(flat)
        if largest > limit:
            # The reason travels in the clear: it names the public bound, never the value.
            raise InfeasibleParametersError(
                f"the weighted update exceeds {limit:.4g}, this node's share of the CKKS "
                f"capacity ({keys.params.capacity:.4g} over {cohort} nodes): the encrypted "
                "sum could wrap around. Use wider parameters (he.WIDE) or smaller weights."
            )
        ckks = load_secret_context(keys.secret_context, keys.params)
        header = Header(key_id=key_id, params=keys.params, layout=layout)
        chunks = encrypt_flat(ckks, flat, keys.params.slots)
        sealed = ArrayRecord({n: a for n, a in arrays.items() if n not in layout.names})
        sealed.update(wire_arrays(header, chunks))
        out = content.copy()
        out["arrays"] = sealed
        return Message(metadata=reply.metadata, content=out)


ckks_mod = CKKSClientMod()
"""The client mod with its defaults: every array encrypted."""
