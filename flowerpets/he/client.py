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
from flowerpets.core.fields import Fields
from flowerpets.exceptions import (
    CiphertextError,
    DecryptionError,
    InfeasibleParametersError,
    InvalidUpdateError,
    KeyMaterialError,
    MessageFieldError,
    MissingKeyError,
    ParameterTypeError,
    ParameterValueError,
    RequestRefusedError,
)
from flowerpets.he._primitives.ciphertexts import Header, encrypt_flat, wire_arrays
from flowerpets.he._primitives.keywrap import KEY_ID_BYTES, KeyBinding, TransportKeys, unwrap, wrap
from flowerpets.he._primitives.packing import Layout, encryption_patterns, peak
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
    FIELD_PARAMS,
    FIELD_PUBLIC_CONTEXT,
    FIELD_PUBLIC_KEY,
    FIELD_RECIPIENT_KEYS,
    FIELD_RECIPIENTS,
    FIELD_SENDER,
    FIELD_VOLUNTEER,
    FIELD_WRAPPED,
    HE_MESSAGE_TYPE,
    KEY_GENERATOR_CONFIG,
    KEY_ID,
    SETUP_RECORD,
    Stage,
)
from flowerpets.he.sealed import open_sealed

__all__ = ["CKKSClientMod", "ckks_mod"]

log = logging.getLogger(__name__)

CallNext = Callable[[Message, Context], Message]

# What a peer's parameters, keys or wrapped key are refused with (ours, raised on purpose by
# the checks they go through; a bare built-in is a bug and is never taken for a refusal).
_BAD_PARAMETERS = (ParameterValueError, ParameterTypeError, KeyMaterialError)
_BAD_KEY = (DecryptionError, MissingKeyError, KeyMaterialError, ParameterValueError)


def _key_id(fields: Fields) -> str:
    value = fields.get(CONFIG_KEY_ID, str)
    if not KEY_ID.fullmatch(value):
        raise RequestRefusedError(f"malformed key id {value!r}")
    return value


def _asked(request: Message) -> tuple[str, list[str], str | None, int] | None:
    """What a request asks of an encrypted reply: key id, arrays, weight metric, cohort size.

    None if it does not ask for encryption; a field missing or mistyped raises
    MessageFieldError.
    """
    content = request.require_content()
    if "config" not in content:
        return None
    fields = Fields.of(content, "config")
    if CONFIG_KEY_ID not in fields:
        return None
    return (
        _key_id(fields),
        fields.items(CONFIG_ENCRYPT, str),
        fields.get(CONFIG_WEIGHT_KEY, str) or None,
        fields.get(CONFIG_COHORT_SIZE, int),
    )


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
        self.encrypt = encryption_patterns(encrypt)
        if "*" not in self.encrypt:
            log.warning(
                "CKKSClientMod(encrypt=%r): arrays matching none of these may be sent to the "
                "server in the clear",
                self.encrypt,
            )
        self._stages: dict[str, Callable[[Message, Context, ClientKeys], ConfigRecord]] = {
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
        try:
            answer = handler(msg, context, keys)
        except MessageFieldError as exc:  # the server's request lacks a field or mistypes one
            raise RequestRefusedError(f"key set-up request: {exc}") from None
        return msg.reply(RecordDict({SETUP_RECORD: answer}))

    def _advertise(self, msg: Message, context: Context, keys: ClientKeys) -> ConfigRecord:
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
        return ConfigRecord(
            {
                FIELD_PUBLIC_KEY: keys.transport_public,
                FIELD_VOLUNTEER: volunteer,
                CONFIG_KEY_ID: keys.key_id,
            }
        )

    def _wrap_for(
        self, context: Context, fields: Fields, keys: ClientKeys, secret: bytes
    ) -> ConfigRecord:
        """Wrap ``secret`` for every recipient the request lists."""
        recipients = fields.items(FIELD_RECIPIENTS, int)
        public_keys = fields.items(FIELD_RECIPIENT_KEYS, bytes)
        if len(recipients) != len(public_keys):
            raise RequestRefusedError("recipients and their keys do not pair up")
        if context.node_id in recipients or len(set(recipients)) != len(recipients):
            raise RequestRefusedError("the recipients repeat a node or include this one")
        assert keys.params is not None
        digest = context_digest(public_context_bytes(load_secret_context(secret, keys.params)))
        wrapped = []
        for node, public in zip(recipients, public_keys, strict=True):
            try:
                binding = KeyBinding(
                    run_id=context.run_id,
                    sender=context.node_id,
                    recipient=node,
                    key_id=bytes.fromhex(keys.key_id),
                    context_digest=digest,
                )
                wrapped.append(wrap(secret, public, binding))
            except (KeyMaterialError, ParameterValueError) as exc:  # a bad key or node id
                raise RequestRefusedError(f"recipient {node}: {exc}") from None
        return ConfigRecord(
            {CONFIG_KEY_ID: keys.key_id, FIELD_RECIPIENTS: recipients, FIELD_WRAPPED: wrapped}
        )

    def _keygen(self, msg: Message, context: Context, keys: ClientKeys) -> ConfigRecord:
        fields = Fields.of(msg.content, SETUP_RECORD)
        try:
            params = CKKSParameters.from_list(fields.items(FIELD_PARAMS, int))
        except _BAD_PARAMETERS as exc:  # insecure or malformed parameters are refused, never used
            raise RequestRefusedError(f"refusing CKKS parameters: {exc}") from None
        ckks = new_secret_context(params)
        keys = keys.after(
            Stage.KEYGEN,
            key_id=secrets.token_bytes(KEY_ID_BYTES).hex(),
            params=params,
            secret_context=secret_context_bytes(ckks),
        )
        out = self._wrap_for(context, fields, keys, keys.secret_context)
        out[FIELD_PUBLIC_CONTEXT] = public_context_bytes(ckks)
        keys.store(context.state)
        return out

    def _share(self, msg: Message, context: Context, keys: ClientKeys) -> ConfigRecord:
        fields = Fields.of(msg.content, SETUP_RECORD)
        keys = keys.after(Stage.SHARE)
        asked = _key_id(fields)
        if asked != keys.key_id:
            raise RequestRefusedError(f"asked to share key {asked}, holds {keys.key_id}")
        return self._wrap_for(context, fields, keys, keys.secret_context)

    def _install(self, msg: Message, context: Context, keys: ClientKeys) -> ConfigRecord:
        fields = Fields.of(msg.content, SETUP_RECORD)
        key_id = _key_id(fields)
        sender = fields.get(FIELD_SENDER, int)
        try:
            params = CKKSParameters.from_list(fields.items(FIELD_PARAMS, int))
            public = fields.get(FIELD_PUBLIC_CONTEXT, bytes)
            load_public_context(public, params)
        except _BAD_PARAMETERS as exc:
            raise RequestRefusedError(f"refusing the key's parameters: {exc}") from None
        if not keys.transport_private:
            raise RequestRefusedError("no transport key: this node was never asked to advertise")
        blob = fields.get(FIELD_WRAPPED, bytes)
        try:
            binding = KeyBinding(
                run_id=context.run_id,
                sender=sender,
                recipient=context.node_id,
                key_id=bytes.fromhex(key_id),
                context_digest=context_digest(public),
            )
            secret = unwrap(blob, keys.transport_private, binding)
            ckks = load_secret_context(secret, params)
        except _BAD_KEY as exc:
            raise RequestRefusedError(f"refusing the wrapped key: {exc}") from None
        if public_context_bytes(ckks) != public:
            raise RequestRefusedError("the wrapped key does not belong to the announced parameters")
        keys = keys.after(Stage.INSTALL, key_id=key_id, params=params, secret_context=secret)
        keys.store(context.state)
        return ConfigRecord({CONFIG_KEY_ID: key_id})

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
        try:
            asked = _asked(request)
        except MessageFieldError as exc:  # the server's request lacks a field or mistypes one
            raise RequestRefusedError(f"the encrypted round's request: {exc}") from None
        if asked is None:
            if protected:
                raise RequestRefusedError(
                    f"the server did not ask for encrypted updates (is HomomorphicAggregation "
                    f"installed?); refusing to send {protected[:5]} in the clear"
                )
            return reply
        key_id, wanted, weight_key, cohort = asked
        keys = ClientKeys.load(context.state)
        if keys.params is None or keys.key_id != key_id:
            raise RequestRefusedError(
                f"the round is under key {key_id}, this node holds {keys.key_id or 'none'}"
            )
        clear = [name for name in protected if name not in wanted]
        if clear:
            raise RequestRefusedError(f"the server would take {clear[:5]} in the clear: refused")
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
