"""The upload queue on Redis Streams: the protocol between a platform and danmul's streaming tagger.

A platform adds one entry per upload to ``{prefix}uploads``::

    XADD danmul:uploads * post_id 123 image_uri s3://bucket/123.jpg tags "1girl solo"

Consumers read it through one consumer group; each upload ends in exactly one of:

- a result: hash ``{prefix}result:{post_id}`` (``characters``, ``tags``, ``model``, ``processed_at``)
  plus one ``{prefix}results`` entry;
- a dead letter: one ``{prefix}dead`` entry with ``reason``, ``detail``, ``attempts`` and the original
  fields.

Either outcome is written by a Lua script that first checks, read-only, that the entry is still pending
to the group, then writes, and acknowledges last (see ``_LUA_COMMON``). A script runs atomically, so the
result and the acknowledgement land together, and an upload delivered twice (a slow consumer whose entry
was reclaimed, a retry after a lost reply) still produces one result. An upload is never acknowledged
without its result or dead letter: a consumer that dies leaves it pending, and another consumer reclaims it
after ``min_idle_ms``; one delivered ``max_deliveries`` times is dead-lettered by id, unread (``poison``
when nothing recorded why its deliveries failed: its consumer or model replica died each time).

Memory is bounded by bytes, not entry counts: reads and reclaims stop at a byte budget, and an entry over
``max_entry_bytes`` is dead-lettered (``too_large``) inside Redis without being sent to the consumer.

The tagger trims the uploads stream itself (:meth:`AsyncUploadQueue.trim`), only below what every group
still needs. Redis 7.0 or newer.

"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from ingest.tags import parse_tag_string

DEFAULT_PREFIX = "danmul:"
DEFAULT_GROUP = "danmul-taggers"
# Streams the platform reads are capped (by the tagger's periodic trim, so between two trims they may grow past
# the cap by what was written meanwhile) so Redis memory stays bounded if nobody trims them; a platform that
# needs more history should consume them faster.
RESULTS_MAXLEN = 1_000_000
DEAD_MAXLEN = 100_000
DEAD_INLINE_IMAGE_MAX = 1 << 20  # an inline image larger than this is not copied into the dead letter
DEAD_MAX_FIELDS = 32  # an upload's own fields copied into its dead letter at most (the rest are counted)
DEAD_MAX_VALUE = 4096  # bytes of any other copied field value; a larger one is replaced by its size
DEAD_MAX_DETAIL = 500
INLINE_IMAGE_MAX = 32 << 20  # the largest inline image an upload may carry (the tagger's decode limit)
MAX_ENTRY_BYTES = INLINE_IMAGE_MAX + (64 << 10)  # a whole entry (every field); larger ones are dead-lettered

# Reason codes of dead letters, beside model.preprocess.ImageError's (empty, too_large, not_an_image,
# decompression_bomb, truncated).
MISSING_POST_ID = "missing_post_id"
BAD_POST_ID = "bad_post_id"
MISSING_IMAGE = "missing_image"
BAD_TAGS = "bad_tags"
NOT_FOUND = "not_found"
FORBIDDEN_PATH = "forbidden_path"
UNSUPPORTED_URI = "unsupported_uri"
MAX_DELIVERIES = "max_deliveries"  # delivered too often, each time failing for a reason that may pass
POISON = "poison"  # delivered too often, each time taking its consumer or model replica down
INTERNAL_ERROR = "internal_error"  # delivered too often, each time failing inside danmul (a script error)
DELETED = "deleted"  # deleted from the uploads stream while pending (XDEL/XTRIM by hand)
TOO_LARGE = "too_large"

# -- the Lua scripts ----------------------------------------------------------------------------------------
# Every script that ends an upload follows one order: read-only checks first (is the entry still pending to
# the group? has it ended already? do the output keys hold the right types?), then the writes, and the
# acknowledgement last. Redis runs a script atomically, so no second writer slips in between; and since nothing
# after the first write can fail (types were checked, argument lists are bounded), an upload is never
# acknowledged without its result or dead letter, nor left half-written. A script that fails before its first
# write (a wrong type, a read-only replica, out of memory) writes nothing: the upload stays pending.
#
# The ledger. Redis may come back knowing only part of what danmul wrote: a replica promoted before it had
# everything, a restart from an older snapshot, or an append-only file whose replay drops every MULTI/EXEC
# block (Redis 7 logs each script's effects as one such block when it wrote more than one command; plain
# commands, the platform's XADDs among them, replay). Then an entry can sit behind the group's last-delivered
# id, not pending, with no result: a later single-entry read replayed while the read that delivered it did
# not. "Not pending" is therefore never read as "ended". Every outcome is recorded in the ledger, the sorted set
# ``{prefix}done`` (members: the entry ids, zero-padded so that their order is the ids' order, all of score 0),
# in the same script as the outcome itself, and:
# - a result or dead letter for an entry that is no longer pending is still written when the ledger does not
#   know it and the entry is still in the stream (Redis forgot its delivery: it is done again, with the same
#   upload_id, and counted as recovered);
# - a read or reclaim that delivers an entry the ledger knows acknowledges it without handing it out;
# - the audit walks the stream behind the group's last-delivered id whenever Redis is another run than the
#   consumer last saw (its run_id: a restart, a failover; and once at a consumer's start), and makes every
#   entry that is neither pending nor ended pending again, idle, so the next reclaim takes it;
# - the trim removes only entries below what the calling consumer's audit has walked in this run of Redis
#   (everything when it is caught up), with the ledger's members below the same id, and writes two commands
#   so that its effects are one block too: a replay that drops blocks drops the trim with the outcomes it
#   relied on.
# Entries delivered before the ledger existed (up to ``ledger_since`` in ``{prefix}state``, the group's
# last-delivered id when a tagger with the ledger first met the group) count as ended once acknowledged.
_LUA_COMMON = """
local function parse_id(id)
  local ms, seq = string.match(id or '', '^(%d+)-(%d+)$')
  return ms, seq
end
-- stream id a < b (ids are decimal without leading zeros: compare lengths, then strings)
local function id_lt(a, b)
  local am, as = parse_id(a)
  local bm, bs = parse_id(b)
  if not am then return true end
  if not bm then return false end
  if #am ~= #bm then return #am < #bm end
  if am ~= bm then return am < bm end
  if #as ~= #bs then return #as < #bs end
  return as < bs
end
local MAX_U64 = '18446744073709551615'
-- a decimal string plus one, as a string (Lua's numbers are doubles: ids above 2^53 lose digits)
local function incr(digits)
  local out, carry = {}, 1
  for j = #digits, 1, -1 do
    local d = string.byte(digits, j) - 48 + carry
    carry = 0
    if d == 10 then
      d = 0
      carry = 1
    end
    out[j] = string.char(48 + d)
  end
  local s = table.concat(out)
  if carry == 1 then s = '1' .. s end
  return s
end
local function fits_u64(s) return #s < 20 or (#s == 20 and s <= MAX_U64) end
-- the smallest stream id after id (id itself when there is none)
local function next_id(id)
  local ms, seq = parse_id(id)
  if not ms then return id end
  local s = incr(seq)
  if fits_u64(s) then return ms .. '-' .. s end
  local m = incr(ms)
  if fits_u64(m) then return m .. '-0' end
  return id
end
local function times_delivered(key, group, id)
  local p = redis.call('XPENDING', key, group, id, id, 1)
  if #p == 0 then return nil end
  return p[1][4]
end
local function holds(key, kind)
  local t = redis.call('TYPE', key)['ok']
  return t == 'none' or t == kind
end
-- the error a script answers, before any write, when one of its output keys holds another type than it
-- writes; nil when all fit. Arguments: key, kind, key, kind...
local function wrong_type(...)
  local args = {...}
  for i = 1, #args - 1, 2 do
    if not holds(args[i], args[i + 1]) then
      return redis.error_reply('WRONGTYPE danmul: ' .. args[i] .. ' holds another type than a ' .. args[i + 1])
    end
  end
  return nil
end
-- a flat [name, value, ...] reply (XINFO's) as a table
local function as_table(flat)
  local t = {}
  for i = 1, #flat - 1, 2 do t[flat[i]] = flat[i + 1] end
  return t
end
-- the consumer groups of a stream, each as a table of XINFO GROUPS' fields
local function groups(key)
  local out = {}
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do out[#out + 1] = as_table(g) end
  return out
end
local function group_info(key, name)
  for _, g in ipairs(groups(key)) do
    if g['name'] == name then return g end
  end
  return nil
end
-- what an entry costs a consumer: its bytes, plus a fixed cost per field (an entry of a million empty
-- fields is not 8 bytes to the process that holds it)
local function entry_size(fields)
  local n = #fields * @HALF_FIELD_COST@
  for i = 1, #fields do n = n + #fields[i] end
  return n
end
-- why an entry cannot be read (too many fields or bytes), or nil
local function unreadable(fields, max_entry)
  if #fields > 2 * @MAX_ENTRY_FIELDS@ then return (#fields / 2) .. ' fields > @MAX_ENTRY_FIELDS@' end
  local size = entry_size(fields)
  if size > max_entry then return 'upload entry of ' .. size .. ' bytes > ' .. max_entry end
  return nil
end
local RESERVED = {post_id = true, upload_id = true, reason = true, detail = true, attempts = true}
-- a dead letter's fields: ours first, then the upload's own, capped in number and size (an inline image up
-- to max_image bytes is kept so it can be re-enqueued; any larger value is replaced by its size)
local function dead_fields(id, fields, reason, detail, attempts, max_fields, max_value, max_image)
  local e = {'post_id', '', 'upload_id', id, 'reason', reason, 'detail', detail, 'attempts', tostring(attempts)}
  local copied, omitted, image_seen = 0, 0, false
  for i = 1, #fields - 1, 2 do
    local name, value = fields[i], fields[i + 1]
    if name == 'post_id' then
      e[2] = string.sub(value, 1, 64)
    elseif RESERVED[name] or #name > 64 or copied >= max_fields then
      omitted = omitted + 1
    else
      local limit = max_value
      if name == 'image' and not image_seen then  -- the first image field only: a dead letter stays small
        limit = max_image
        image_seen = true
      end
      if #value <= limit then
        e[#e + 1] = name
        e[#e + 1] = value
      else
        e[#e + 1] = name .. '_bytes'
        e[#e + 1] = tostring(#value)
      end
      copied = copied + 1
    end
  end
  if omitted > 0 then
    e[#e + 1] = 'omitted_fields'
    e[#e + 1] = tostring(omitted)
  end
  return e
end
local function stored_fields(key, id)
  local r = redis.call('XRANGE', key, id, id)
  if #r == 0 then return {} end
  return r[1][2]
end
-- an entry id as a ledger member: zero-padded, so that the members' order is the ids' order
local function member(id)
  local ms, seq = parse_id(id)
  if not ms then return id end
  return string.rep('0', 20 - #ms) .. ms .. '-' .. string.rep('0', 20 - #seq) .. seq
end
local function in_ledger(done, id) return redis.call('ZSCORE', done, member(id)) ~= false end
-- The seal: a script that moved the group or an entry (XREADGROUP, XCLAIM, XAUTOCLAIM, XGROUP, XACK) also writes
-- this, so that its effects are two commands or more: one MULTI/EXEC block in the append-only file, never a
-- plain command. Redis logs every claim as XCLAIM ... LASTID <the group's last-delivered id>: a plain one
-- (a heartbeat's or a read's single entry) replayed where the blocks before it were dropped moves the group
-- past entries whose delivery was dropped, and they look acknowledged without an outcome.
local function seal(state, what) redis.call('HSET', state, 'sealed', what) end
-- which Redis this is: its process (run_id) and its data's lineage (master_replid: new on a promotion and on a
-- full resync from another primary); 'unknown' where the user may not run INFO
local function run_identity()
  local info = redis.pcall('INFO', 'server', 'replication')
  if type(info) ~= 'string' then return 'unknown' end
  return (string.match(info, 'run_id:(%x+)') or '?') .. ':' .. (string.match(info, 'master_replid:(%x+)') or '?')
end
local function record(done, id) redis.call('ZADD', done, 0, member(id)) end
-- whether an entry that is not pending has ended: the ledger knows it, or it was delivered before the ledger
-- existed (at or below since)
local function ended(done, since, id)
  return in_ledger(done, id) or (since ~= '' and not id_lt(since, id))
end
"""

# Ending an upload as a dead letter, by id (its fields are copied from the stream).
_DEAD_LUA = _LUA_COMMON + """
local uploads, dead, attempts, done = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group, id, reason, detail = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local max_fields, max_value, max_image = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local unfit = wrong_type(dead, 'stream', attempts, 'hash', done, 'zset')
if unfit then return unfit end
local delivered = times_delivered(uploads, group, id)
local fields, recovered = {}, 0
if delivered then
  fields = stored_fields(uploads, id)
else
  if in_ledger(done, id) then return {0, 0} end  -- another delivery ended it
  fields = stored_fields(uploads, id)
  if #fields == 0 then return {3, 0} end  -- not in the stream: ended and trimmed, or deleted, or never held
  delivered, recovered = 1, 1  -- Redis forgot this delivery: the upload has no outcome yet
end
local e = dead_fields(id, fields, reason, detail, delivered, max_fields, max_value, max_image)
redis.call('XADD', dead, '*', unpack(e))
if #fields > 0 then record(done, id) end
redis.call('HDEL', attempts, id)
redis.call('XACK', uploads, group, id)
return {1, recovered}
"""

# Ending an upload with its result: the result hash (unless it holds a newer upload's), one results entry.
# ARGV after the fixed ones: n + the hash's fields, then m + the results entry's fields (both fixed, short lists
# built by danmul). Returns {status, recovered}: status 1 (written), 2 (the results entry written, the hash kept:
# it holds a newer upload's result), 0 (another delivery ended it: nothing written), 3 (not in the stream any
# more: nothing written); recovered 1 when Redis had forgotten the delivery.
_COMPLETE_LUA = _LUA_COMMON + """
local uploads, result, results, attempts, done = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local group, id, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local unfit = wrong_type(result, 'hash', results, 'stream', attempts, 'hash', done, 'zset')
if unfit then return unfit end
local recovered = 0
if not times_delivered(uploads, group, id) then
  if in_ledger(done, id) then return {0, 0} end
  if #redis.call('XRANGE', uploads, id, id) == 0 then return {3, 0} end
  recovered = 1
end
local n = tonumber(ARGV[4])
local m = tonumber(ARGV[5 + n])
local current = redis.call('HGET', result, 'upload_id')
local newest = (not current) or not id_lt(id, current)
if newest then
  local hash = {}
  for i = 1, n do hash[i] = ARGV[4 + i] end
  redis.call('DEL', result)
  redis.call('HSET', result, 'upload_id', id, unpack(hash))
  if ttl > 0 then redis.call('EXPIRE', result, ttl) end
end
local entry = {}
for i = 1, m do entry[i] = ARGV[5 + n + i] end
if not newest then
  entry[#entry + 1] = 'superseded'
  entry[#entry + 1] = '1'
end
redis.call('XADD', results, '*', unpack(entry))
record(done, id)
redis.call('HDEL', attempts, id)
redis.call('XACK', uploads, group, id)
if newest then return {1, recovered} end
return {2, recovered}
"""

# Reading new uploads with a byte budget. XREADGROUP one entry at a time (so the script never holds more than
# the budget plus one entry): an entry over max_entry is dead-lettered as too_large at once, unread by the
# consumer; one the ledger knows (its outcome was written while Redis had forgotten its delivery) is
# acknowledged, not handed out. Returns {uploads, dead, ended}: uploads = {id, fields, size}..., dead = {id,
# reason, detail}..., ended = how many were acknowledged as already ended.
_READ_LUA = _LUA_COMMON + """
local uploads, dead, attempts, done, state = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local group, consumer, count, max_entry, budget = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]),
                                                  tonumber(ARGV[5])
local max_fields, max_value, max_image = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local unfit = wrong_type(dead, 'stream', attempts, 'hash', done, 'zset', state, 'hash')
if unfit then return unfit end
local out, buried, total, skipped, drained = {}, {}, 0, 0, false
for _ = 1, count do
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', uploads, '>')
  if not r then
    drained = true
    break
  end
  local id, fields = r[1][2][1][1], r[1][2][1][2]
  if in_ledger(done, id) then
    redis.call('XACK', uploads, group, id)
    skipped = skipped + 1
  else
    local detail = unreadable(fields, max_entry)
    if detail then
      local e = dead_fields(id, fields, 'too_large', detail, 1, max_fields, max_value, max_image)
      redis.call('XADD', dead, '*', unpack(e))
      record(done, id)
      redis.call('XACK', uploads, group, id)
      buried[#buried + 1] = {id, 'too_large', detail}
      break
    end
    local size = entry_size(fields)
    out[#out + 1] = {id, fields, size}
    total = total + size
    if total >= budget then break end
  end
end
if #out > 0 or skipped > 0 then seal(state, 'read') end
-- Nothing after the group's last-delivered id: nothing waits, so its lag is 0. Redis counts the lag as entries
-- added minus entries read, and a replay or a replica does not carry the group's read counter (reads are
-- logged as XCLAIM ... LASTID), so after one the count can stay above 0 for good; so does the count of
-- entries deleted before they were delivered. Set it right, and say by how much (the caller logs it).
local corrected = 0
local info = drained and group_info(uploads, group)
if info and type(info['lag']) == 'number' and info['lag'] > 0 and type(info['entries-read']) == 'number' then
  redis.call('XGROUP', 'SETID', uploads, group, info['last-delivered-id'], 'ENTRIESREAD',
             info['entries-read'] + info['lag'])
  seal(state, 'lag')
  corrected = info['lag']
end
return {out, buried, skipped, corrected}
"""

# Taking over uploads whose consumer died or hung (idle longer than min_idle), one at a time from a cursor
# that persists across calls. Before an entry is read its delivery count is checked (XAUTOCLAIM JUSTID
# claims without counting or loading it): one delivered max_deliveries times already is dead-lettered by id
# (poison: it took its consumer or model replica down each time; internal_error / max_deliveries: the last
# recorded failure), never decoded again. Entries deleted from the stream while pending (XAUTOCLAIM drops
# them from the pending list) are dead-lettered as deleted; entries the ledger knows are acknowledged. The
# rest are claimed with XCLAIM (which counts the delivery and loads the body) under the same byte budget as
# reads. Returns {next cursor, uploads {id, fields, size, deliveries}..., dead {id, reason, detail}..., ended}.
_CLAIM_LUA = _LUA_COMMON + """
local uploads, dead, attempts, done, state = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local group, consumer, min_idle, cursor = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local count, max_entry, budget, max_deliveries = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]),
                                                 tonumber(ARGV[8])
local max_fields, max_value, max_image = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local unfit = wrong_type(dead, 'stream', attempts, 'hash', done, 'zset', state, 'hash')
if unfit then return unfit end
local out, buried, total, skipped, moved = {}, {}, 0, 0, false
-- a dead letter; in_stream: the entry is still in the stream (then it is acknowledged and in the ledger)
local function bury(id, fields, reason, detail, delivered, in_stream)
  local e = dead_fields(id, fields, reason, detail, delivered, max_fields, max_value, max_image)
  redis.call('XADD', dead, '*', unpack(e))
  redis.call('HDEL', attempts, id)
  if in_stream then
    record(done, id)
    redis.call('XACK', uploads, group, id)
  end
  buried[#buried + 1] = {id, reason, detail}
end
for _ = 1, count do
  local r = redis.call('XAUTOCLAIM', uploads, group, consumer, min_idle, cursor, 'COUNT', 1, 'JUSTID')
  cursor = r[1]
  moved = moved or #r[2] > 0 or #(r[3] or {}) > 0
  for _, id in ipairs(r[3] or {}) do
    bury(id, {}, 'deleted', 'deleted from the uploads stream while pending', 0, false)
  end
  local id = r[2][1]
  if id then
    local delivered = times_delivered(uploads, group, id)
    if in_ledger(done, id) then
      redis.call('XACK', uploads, group, id)
      skipped = skipped + 1
    elseif delivered >= max_deliveries then
      local last = redis.call('HGET', attempts, id)
      local reason, detail = 'max_deliveries', 'delivered ' .. delivered .. ' times without a result'
      if not last or last == 'replica_died' then
        reason = 'poison'
        detail = detail .. ': its consumer or model replica stopped each time'
      elseif last == 'internal_error' then
        reason = 'internal_error'
      else
        detail = detail .. '; last: ' .. last
      end
      local fields = stored_fields(uploads, id)
      bury(id, fields, reason, detail, delivered, #fields > 0)
    else
      local c = redis.call('XCLAIM', uploads, group, consumer, 0, id)
      if #c > 0 then
        local fields = c[1][2]
        local size = entry_size(fields)
        local why = unreadable(fields, max_entry)
        if why then
          bury(id, fields, 'too_large', why, delivered + 1, true)
        else
          out[#out + 1] = {id, fields, size, delivered + 1}
          total = total + size
        end
      end
    end
  end
  if cursor == '0-0' or total >= budget then break end
end
if moved then seal(state, 'claim') end
return {cursor, out, buried, skipped}
"""

# Heartbeat: reset the idle time of uploads this consumer is still working on (XCLAIM JUSTID neither counts
# a delivery nor loads the entry), so a slow upload is not reclaimed from under a live consumer. Only
# entries still pending to this consumer are touched; one deleted from the stream meanwhile (which XCLAIM
# drops from the pending list) gets its `deleted` dead letter here. ARGV: group, consumer, max_fields, max_value,
# max_image, ids... Returns {touched, deleted ids}.
_TOUCH_LUA = _LUA_COMMON + """
local uploads, dead, attempts, state = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group, consumer = ARGV[1], ARGV[2]
local max_fields, max_value, max_image = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local unfit = wrong_type(dead, 'stream', attempts, 'hash', state, 'hash')
if unfit then return unfit end
local n, gone = 0, {}
for i = 6, #ARGV do
  local id = ARGV[i]
  local p = redis.call('XPENDING', uploads, group, id, id, 1)
  if #p == 1 and p[1][2] == consumer then
    -- XCLAIM drops an entry deleted from the stream from the pending list: its dead letter, now
    if #redis.call('XCLAIM', uploads, group, consumer, 0, id, 'JUSTID') == 0 then
      local e = dead_fields(id, {}, 'deleted', 'deleted from the uploads stream while pending', p[1][4],
                            max_fields, max_value, max_image)
      redis.call('XADD', dead, '*', unpack(e))
      redis.call('HDEL', attempts, id)
      gone[#gone + 1] = id
    else
      n = n + 1
    end
  end
end
if n > 0 or #gone > 0 then seal(state, 'touch') end
return {n, gone}
"""

# Retention: trim ended uploads older than keep_ms from the head of the stream: never an entry at or above the
# oldest one any group still needs (the first after its last-delivered id, or its oldest pending entry), and
# never one above what the calling consumer's audit has walked in this run of Redis (run_id and audited: the
# audit's cursor, or '+' once it is caught up; below it every entry that is not pending has ended, see the
# ledger above). The ledger's members below the same id go with it (with them any left behind: an entry deleted
# by hand), and the state hash records the floor: two writes, so a trim is one MULTI/EXEC block in the
# append-only file and replays only together with blocks. Nothing here reads an upload. The same script caps
# the results and dead-letter streams at about their maximum length by XTRIM MINID, reading the oldest
# entries over the cap (at most cap_entries and about cap_bytes per call): an approximate MAXLEN is logged as an
# exact length (the stream's length then), which cuts other entries when a replay rebuilds another history
# (blocks dropped by one restart and replayed by the next), while a MINID cuts only what was already older
# than what it kept. Returns {uploads trimmed, results capped, dead letters capped, more (1: a cap ran out of
# its budget, call again soon)}.
_TRIM_LUA = _LUA_COMMON + """
local uploads, done, state, results, dead = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local keep_ms, run_id, audited = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local results_maxlen, dead_maxlen = tonumber(ARGV[4]), tonumber(ARGV[5])
local cap_entries, cap_bytes = tonumber(ARGV[6]), tonumber(ARGV[7])
local more = 0
-- the oldest entries of a stream over maxlen, up to the budget, removed by MINID
local function cap(stream, maxlen)
  if redis.call('TYPE', stream)['ok'] ~= 'stream' then return 0 end
  local excess = redis.call('XLEN', stream) - maxlen
  if excess <= 0 then return 0 end
  local last, bytes, start, n = nil, 0, '-', 0
  while n < excess do
    if n >= cap_entries or bytes >= cap_bytes then
      more = 1
      break
    end
    local r = redis.call('XRANGE', stream, start, '+', 'COUNT', 1)
    if #r == 0 then break end
    last, start, n = r[1][1], '(' .. r[1][1], n + 1
    bytes = bytes + entry_size(r[1][2])
  end
  if not last then return 0 end
  return redis.call('XTRIM', stream, 'MINID', next_id(last))
end
local capped_results, capped_dead = cap(results, results_maxlen), cap(dead, dead_maxlen)
if run_identity() ~= run_id or audited == '-' or redis.call('EXISTS', uploads) == 0 or not holds(done, 'zset')
    or not holds(state, 'hash') then
  return {0, capped_results, capped_dead, more}  -- Redis changed since the caller's audit: not before it walked
end
local floor = nil
for _, gi in ipairs(groups(uploads)) do
  local need = next_id(gi['last-delivered-id'])  -- everything up to the last delivered one
  local p = redis.call('XPENDING', uploads, gi['name'])
  if p[1] > 0 and id_lt(p[2], need) then need = p[2] end
  if floor == nil or id_lt(need, floor) then floor = need end
end
if floor == nil then return {0, capped_results, capped_dead, more} end
if audited ~= '+' and id_lt(next_id(audited), floor) then floor = next_id(audited) end
local t = redis.call('TIME')
local cutoff_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - keep_ms
if cutoff_ms <= 0 then return {0, capped_results, capped_dead, more} end
local cutoff = string.format('%d-0', cutoff_ms)
if id_lt(cutoff, floor) then floor = cutoff end
local trimmed = redis.call('XTRIM', uploads, 'MINID', floor)
redis.call('ZREMRANGEBYLEX', done, '-', '(' .. member(floor))
if trimmed > 0 then redis.call('HSET', state, 'trimmed_below', floor) end
return {trimmed, capped_results, capped_dead, more}
"""

# The audit: when Redis is another run than the caller saw (its run_id differs: a restart, a failover; and at a
# consumer's start, when it saw none), walk the group's delivered entries from the stream's start and make every
# one that is neither pending nor ended pending again (to this consumer, idle for long, delivered 0 times), so
# the next reclaim takes it. A walk is resumed from a cursor, at most max_entries and about max_bytes per call;
# once caught up it rests until Redis changes again (a Redis that has not restarted forgets nothing). ARGV:
# group, consumer, run_id seen, cursor ('-' for the start), caught up (1/0), max_entries, max_bytes, idle_ms.
# Returns {run_id, cursor, found, caught_up (1 when the walk reached the group's last-delivered id)}.
_AUDIT_LUA = _LUA_COMMON + """
local uploads, done, state = KEYS[1], KEYS[2], KEYS[3]
local group, consumer, seen, cursor, rested = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local max_entries, max_bytes, idle_ms = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
-- INFO needs a right some ACLs withhold (@dangerous): check_server refuses a user without it
local run_id = run_identity()
if run_id ~= seen then
  cursor = '-'
  -- another consumer walked this run of Redis to its end already (recorded below): nothing to do again
  if run_id ~= 'unknown' and redis.call('HGET', state, 'audited') == run_id then return {run_id, '-', 0, 1} end
elseif rested == '1' then
  return {run_id, cursor, 0, 1}
end
if redis.call('EXISTS', uploads) == 0 or not holds(done, 'zset') or not holds(state, 'hash') then
  return {run_id, cursor, 0, 1}
end
local since = redis.call('HGET', state, 'ledger_since') or ''
local ours = group_info(uploads, group)
if not ours then return {run_id, cursor, 0, 1} end
local last = ours['last-delivered-id']
local found, bytes, caught_up = 0, 0, 0
for _ = 1, max_entries do
  local start = cursor
  if start ~= '-' then start = '(' .. cursor end
  if cursor ~= '-' and next_id(cursor) == cursor then  -- the largest id there is: nothing comes after it
    caught_up = 1
    break
  end
  local r = redis.call('XRANGE', uploads, start, last, 'COUNT', 1)
  if #r == 0 then
    caught_up = 1
    break
  end
  local id = r[1][1]
  cursor = id
  if not times_delivered(uploads, group, id) and not ended(done, since, id) then
    redis.call('XCLAIM', uploads, group, consumer, 0, id, 'IDLE', idle_ms, 'RETRYCOUNT', 0, 'FORCE', 'JUSTID')
    found = found + 1
  end
  bytes = bytes + entry_size(r[1][2])
  if bytes >= max_bytes then break end
end
if found > 0 then seal(state, 'audit') end
if caught_up == 1 and run_id ~= 'unknown' then
  redis.call('HSET', state, 'audited', run_id)  -- consumers that start later in this run need not walk again
end
return {run_id, cursor, found, caught_up}
"""

# The ledger's starting point, once the group exists: the group's last-delivered id when a tagger with the
# ledger first meets it. For a group this tagger made, nothing was delivered yet ('0-0': every entry needs a
# ledger member to count as ended); a group a tagger without the ledger ran counts what it delivered up to now
# as ended once acknowledged. The group is made by a plain XGROUP CREATE before this, and this writes one
# command: both replay even when an append-only file's blocks do not. A ledger that exists already means the
# tagger ran here with it (the state hash was lost): '0-0'. KEYS: uploads, state, done. ARGV: group.
_ENSURE_LUA = _LUA_COMMON + """
local uploads, state, done, group = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
if redis.call('EXISTS', done) == 1 then return redis.call('HSETNX', state, 'ledger_since', '0-0') end
local ours = group_info(uploads, group)
if not ours then return 0 end
return redis.call('HSETNX', state, 'ledger_since', ours['last-delivered-id'])
"""

# Consumers that left the group's list behind them (killed, restarted under a new name): a consumer that has
# nothing pending and has not been heard from in max_idle_ms is deleted (deleting one with pending entries
# would drop them). ARGV: group, max_idle_ms, our own name. Returns how many were deleted.
_FORGET_LUA = _LUA_COMMON + """
local uploads, state, group, max_idle, me = KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2]), ARGV[3]
if redis.call('EXISTS', uploads) == 0 then return 0 end
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', uploads, group)
if not ok then return 0 end
local n = 0
for _, c in ipairs(consumers) do
  local info = as_table(c)
  if info['name'] ~= me and tonumber(info['pending']) == 0 and tonumber(info['idle']) >= max_idle then
    redis.call('XGROUP', 'DELCONSUMER', uploads, group, info['name'])
    n = n + 1
  end
end
if n > 0 then seal(state, 'forget') end
return n
"""


ENTRY_FIELD_COST = 64  # bytes an entry's field costs a consumer beyond its name and value
# the audit, and the caps of the results and dead-letter streams, read entries to walk them: per call at most
# this many, and about these bytes (Redis copies what it reads into the script: about 1.5 ms per MiB)
AUDIT_MAX_ENTRIES, AUDIT_MAX_BYTES = 2_000, 16 << 20
CAP_MAX_ENTRIES, CAP_MAX_BYTES = 10_000, 4 << 20  # at most ~10 ms of Redis a call
FORGOTTEN_IDLE_MS = 10**10  # a forgotten upload made pending again looks idle this long: any reclaim takes it
MAX_ENTRY_FIELDS = 256  # an entry with more fields is dead-lettered (too_large) unread
for _name in [n for n in globals() if n.endswith("_LUA")]:  # every script: those built on _LUA_COMMON need it
    globals()[_name] = globals()[_name].replace("@HALF_FIELD_COST@", str(ENTRY_FIELD_COST // 2)).replace(
        "@MAX_ENTRY_FIELDS@", str(MAX_ENTRY_FIELDS))


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix (default ``danmul:``; on a Redis Cluster one with a hash tag, such as
    ``{danmul}:``, so that every key of the protocol lives in one slot and the scripts may touch them
    together)."""

    prefix: str = DEFAULT_PREFIX

    @property
    def uploads(self) -> str:
        return f"{self.prefix}uploads"

    @property
    def results(self) -> str:
        return f"{self.prefix}results"

    @property
    def dead(self) -> str:
        return f"{self.prefix}dead"

    @property
    def attempts(self) -> str:
        """Hash: pending upload id -> why its last delivery left it pending (so the dead letter says why)."""
        return f"{self.prefix}attempts"

    @property
    def done(self) -> str:
        """Sorted set, the ledger: the ids of the uploads still in the stream that have ended (a result or a dead
        letter), zero-padded so they sort as ids; added with each outcome, removed with the entry by the trim."""
        return f"{self.prefix}done"

    @property
    def state(self) -> str:
        """Hash of the tagger's own bookkeeping on the stream: ``ledger_since`` (entries delivered up to it, before
        the ledger existed, count as ended once acknowledged; ``0-0`` for a group made with the ledger),
        ``trimmed_below`` (the trim's last floor)."""
        return f"{self.prefix}state"

    def result(self, post_id: int | str) -> str:
        return f"{self.prefix}result:{post_id}"

    @property
    def hash_tag(self) -> str | None:
        """The part of the prefix Redis Cluster hashes (``danmul`` for ``{danmul}:``), or None."""
        start = self.prefix.find("{")
        end = self.prefix.find("}", start + 1)
        return self.prefix[start + 1 : end] if start >= 0 and end > start + 1 else None


class BadUpload(ValueError):
    """An upload that can never succeed. ``reason`` is its dead-letter code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class Upload:
    """One stream entry as delivered: its id, raw fields and how many times it has been delivered."""

    entry_id: str
    fields: dict[str, bytes]
    deliveries: int = 1
    size: int = 0  # bytes of the entry (field names and values)

    @property
    def enqueued_at(self) -> float:
        """Unix seconds at which Redis accepted the entry."""
        return entry_ms(self.entry_id) / 1000.0

    def text(self, name: str) -> str | None:
        value = self.fields.get(name)
        if value is None:
            return None
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadUpload(f"bad_{name}", "not UTF-8") from None


@dataclass
class UploadRequest:
    """A validated upload: what the tagger needs to fetch the image and run the model."""

    post_id: int
    image_uri: str | None = None
    image: bytes | None = None
    tags: list[str] | None = None  # None: none came with the upload (image-only)


def parse_upload(upload: Upload, max_image_bytes: int) -> UploadRequest:
    """Validate an entry's fields. Raises :class:`BadUpload` for anything that can never succeed."""
    raw_id = upload.text("post_id")
    if raw_id is None or not raw_id.strip():
        raise BadUpload(MISSING_POST_ID)
    # ASCII digits, no leading zero: Python's int() also takes '1_000', ' +77 ', full-width digits and '007', each
    # of which would name another key (result:{post_id}) than the one a platform looks up
    if not _POST_ID.fullmatch(raw_id):
        raise BadUpload(BAD_POST_ID, f"{raw_id[:40]!r} is not a whole number in ASCII digits without a leading 0")
    if len(raw_id) > 19 or int(raw_id) >= 2**63:
        raise BadUpload(BAD_POST_ID, f"{raw_id[:40]} is out of range (at most 2^63 - 1)")
    post_id = int(raw_id)
    image = upload.fields.get("image")
    uri = upload.text("image_uri")
    if not image and not (uri and uri.strip()):
        raise BadUpload(MISSING_IMAGE, "neither image_uri nor image")
    if image is not None and len(image) > max_image_bytes:
        raise BadUpload("too_large", f"inline image of {len(image)} bytes > {max_image_bytes}")
    tags = None
    tag_text = upload.text("tags")
    if tag_text:
        try:
            tags = parse_tag_string(tag_text) or None
        except ValueError as e:
            raise BadUpload(BAD_TAGS, str(e)) from None
    return UploadRequest(post_id, uri.strip() if uri and not image else None, image or None, tags)


_POST_ID = re.compile(r"0|[1-9][0-9]*")


class RedisSetupError(ValueError):
    """Redis is reachable but unfit to run on (credentials refused, version, eviction policy, cluster key
    layout): a clear, fatal message for the operator, not something to retry."""


AUTH_ERRORS = (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError,
               redis.exceptions.NoPermissionError)


def tls_untrusted(e: BaseException) -> bool:
    """Whether a connection failed because the server's TLS certificate could not be verified (a setup
    problem to report, not an outage to wait out)."""
    seen: BaseException | None = e
    while seen is not None:
        if "CERTIFICATE_VERIFY_FAILED" in str(seen) or "certificate verify failed" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _credentials(url: str) -> dict[str, str]:
    """Username and password for ``url`` from the environment, where the URL does not carry them itself:
    ``REDIS_USERNAME``/``REDIS_PASSWORD`` work with or without a user in the URL (``rediss://danmul@host``
    plus ``REDIS_PASSWORD`` from a Kubernetes Secret), and never override what the URL says."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    out = {}
    if parts.password is None and "password" not in query and os.environ.get("REDIS_PASSWORD"):
        out["password"] = os.environ["REDIS_PASSWORD"]
    if not parts.username and "username" not in query and os.environ.get("REDIS_USERNAME"):
        out["username"] = os.environ["REDIS_USERNAME"]
    return out


def connect(url: str, asyncio: bool = False, socket_timeout: float = 30.0, retries: int = 3,
            max_connections: int = 64, ca_file: str | None = None, cluster: bool = False):
    """A client for a ``redis://`` or ``rediss://`` (TLS) URL, or a Redis Cluster (``cluster``; any node's
    URL). User and password come from the URL or, so they stay off command lines and config files, from
    ``REDIS_USERNAME`` / ``REDIS_PASSWORD``; a TLS server is verified against ``ca_file`` (else
    ``REDIS_CA_FILE``, else the system's CAs). The socket timeout is longer than any blocking call we
    make (redis-py 8's default of 5 s would cut them short); connection errors are retried with backoff,
    refused credentials are not (they raise ``AUTH_ERRORS`` at once)."""
    _, userinfo, _ = _split_userinfo(url)
    if userinfo is not None and any(c in userinfo for c in "/?#@"):
        raise RedisSetupError("the Redis URL's user or password holds an unencoded '/', '?', '#' or '@': "
                              "percent-encode it, or pass the password as REDIS_PASSWORD")
    kwargs: dict[str, Any] = dict(
        socket_timeout=socket_timeout, socket_connect_timeout=10.0,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError], **_credentials(url),
    )  # fmt: skip
    ca = ca_file or os.environ.get("REDIS_CA_FILE")
    if ca and url.startswith("rediss://"):
        if not os.path.isfile(ca):
            raise RedisSetupError(f"the Redis CA file {ca} does not exist")
        kwargs["ssl_ca_certs"] = ca
    if cluster:
        from redis.asyncio.cluster import RedisCluster as AsyncCluster
        from redis.cluster import RedisCluster

        kwargs.pop("retry_on_error")
        return (AsyncCluster if asyncio else RedisCluster).from_url(url, max_connections=max_connections, **kwargs)
    kwargs["health_check_interval"] = 15
    # A bounded pool that waits for a free connection: hundreds of uploads in flight share a few
    # connections instead of failing with "too many connections".
    pool_cls = aioredis.BlockingConnectionPool if asyncio else redis.BlockingConnectionPool
    pool = pool_cls.from_url(url, max_connections=max_connections, timeout=socket_timeout, **kwargs)
    return (aioredis.Redis if asyncio else redis.Redis)(connection_pool=pool)


_SECRET_QUERY = ("password", "pass", "passwd", "pwd", "secret", "token", "auth", "requirepass", "ssl_password")


def _split_userinfo(url: str) -> tuple[str, str | None, str]:
    """``scheme://userinfo@rest`` -> (``scheme://``, userinfo or None, rest). The userinfo ends at the
    *last* ``@`` of the URL, so a password with an unencoded ``/``, ``?``, ``#`` or ``@`` (common in
    generated ones) is still found whole, where a URL parser would cut it and leak the rest."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "", None, url
    if "@" not in rest:
        return scheme + sep, None, rest
    userinfo, _, rest = rest.rpartition("@")
    return scheme + sep, userinfo, rest


def _strip_secrets(url: str, replacement: str | None) -> str:
    head, userinfo, rest = _split_userinfo(url)
    if userinfo is not None:
        user, has_password, _ = userinfo.partition(":")
        if has_password:
            userinfo = f"{user}:{replacement}" if replacement is not None else user
        rest = f"{userinfo}@{rest}" if userinfo else rest
    path, q, query = rest.partition("?")
    pairs = []
    for pair in query.split("&"):
        if not pair:
            continue
        name = pair.partition("=")[0]
        if name.lower() in _SECRET_QUERY:
            if replacement is not None:
                pairs.append(f"{name}={replacement}")
        else:
            pairs.append(pair)
    return head + path + (q + "&".join(pairs) if pairs else "")


def redact(url: str) -> str:
    """A Redis URL fit for logs: a password in the userinfo or in the query (``?password=``, and any
    other parameter that names a secret) replaced by ``***``."""
    try:
        return _strip_secrets(url, "***")
    except ValueError:
        return "<unparseable Redis URL>"


def without_password(url: str) -> str:
    """``url`` with every password removed (userinfo and query), for config files: the secret then comes
    from ``REDIS_PASSWORD`` where the tagger runs."""
    return _strip_secrets(url, None)


EVICTING = "allkeys-"  # maxmemory policies that may evict any key, streams included


# Every command the scripts and the consumer use, tried read-only (or on a missing probe key) under the
# caller's ACL: a user who may not run one fails at start-up, not mid-stream. KEYS: uploads, probe key.
_PROBE_LUA = """
local denied = {}
local function try(...)
  local r = redis.pcall(...)
  if type(r) == 'table' and r['err'] and (string.find(r['err'], 'NOPERM', 1, true)
      or string.find(r['err'], "can't run this command", 1, true)) then
    denied[#denied + 1] = string.lower((...))
  end
end
try('TYPE', KEYS[1])
try('XLEN', KEYS[1])
try('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
try('XINFO', 'GROUPS', KEYS[2])
try('XPENDING', KEYS[2], 'g')
try('XREADGROUP', 'GROUP', 'g', 'c', 'COUNT', 1, 'STREAMS', KEYS[2], '>')
try('XAUTOCLAIM', KEYS[2], 'g', 'c', 0, '0-0', 'COUNT', 1, 'JUSTID')
try('XCLAIM', KEYS[2], 'g', 'c', 0, '0-0', 'JUSTID')
try('XACK', KEYS[2], 'g', '0-1')
try('XADD', KEYS[2], 'NOMKSTREAM', '*', 'f', 'v')
try('XTRIM', KEYS[2], 'MINID', '0-0')
try('XGROUP', 'CREATE', KEYS[2], 'g', '$')
try('EXISTS', KEYS[2])
try('HGET', KEYS[2], 'f')
try('HSETNX', KEYS[2], 'f', 'v')
try('ZSCORE', KEYS[2], 'm')
try('ZADD', KEYS[2], 0, 'm')
try('ZREMRANGEBYLEX', KEYS[2], '-', '(m')
try('XINFO', 'CONSUMERS', KEYS[2], 'g')
try('XGROUP', 'DELCONSUMER', KEYS[2], 'g', 'c')
try('XGROUP', 'SETID', KEYS[2], 'g', '$')
try('HDEL', KEYS[2], 'f')
try('HSET', KEYS[2], 'f', 'v')
try('EXPIRE', KEYS[2], 1)
try('DEL', KEYS[2])
try('TIME')
return denied
"""


NEEDS_INFO = ("the Redis user may not run INFO: the tagger needs it (the server's version and eviction policy, and "
              "which run of Redis it works on: after a restart or failover it checks for uploads Redis forgot). "
              "Allow it with +info")


def check_server(client, keys: Keys, allow_eviction: bool = False, cluster: bool = False, group: str | None = None,
                 allow_other_groups: bool = False) -> list[str]:
    """Refuse a Redis the tagger cannot keep its promise on (raises :class:`RedisSetupError` with what to
    change); returns warnings worth a log line. Sync client. Checks: the credentials work (PING and the
    commands the protocol needs), Redis is 7.0 or newer (XAUTOCLAIM's deleted-entry list, consumer-group
    lag), the eviction policy cannot evict the uploads stream, on a cluster the prefix carries a hash
    tag, the user may run every command the protocol needs, danmul's keys hold the right types, and (with
    ``group``) no other consumer group reads the uploads stream: a second group would tag every upload
    again and hold back trimming (``allow_other_groups`` when another reader is meant to be there).
    Connection errors propagate (Redis may just be starting)."""
    warnings: list[str] = []
    try:
        client.ping()
        try:
            info, memory = client.info("server"), client.info("memory")
        except redis.exceptions.NoPermissionError:  # logged in, but INFO is withheld (an ACL without @dangerous)
            raise RedisSetupError(NEEDS_INFO) from None
    except AUTH_ERRORS as e:
        raise RedisSetupError(f"Redis refused the credentials ({e}): check the user and password in the URL, "
                              "or REDIS_USERNAME / REDIS_PASSWORD, and the user's ACL") from None
    except redis.ConnectionError as e:
        if tls_untrusted(e):
            raise RedisSetupError(f"Redis's TLS certificate is not trusted ({e}): pass the CA that signed it as "
                                  "--redis-ca-file (or REDIS_CA_FILE)") from None
        raise
    if cluster:  # a cluster client answers per node: any node's answer will do
        info = next(iter(info.values())) if info and isinstance(next(iter(info.values())), dict) else info
        memory = next(iter(memory.values())) if memory and isinstance(next(iter(memory.values())), dict) else memory
    version = str(info.get("redis_version", "7.0"))
    if tuple(int(x) for x in version.split(".")[:2] if x.isdigit()) < (7, 0):
        raise RedisSetupError(f"Redis {version} is too old: danmul needs 7.0 or newer (XAUTOCLAIM reports "
                              "uploads deleted while pending; consumer groups report lag)")
    policy = str(memory.get("maxmemory_policy", "noeviction"))
    if policy.startswith(EVICTING):
        message = (f"Redis evicts keys under memory pressure (maxmemory-policy {policy}): it could evict the "
                   "uploads stream and lose every upload in it. Set maxmemory-policy noeviction (or volatile-*)")
        if not allow_eviction:
            raise RedisSetupError(message + ", or pass --allow-eviction to run anyway")
        warnings.append(message + "; running anyway (--allow-eviction)")
    elif policy.startswith("volatile-") and policy != "volatile-ttl":
        warnings.append(f"maxmemory-policy {policy}: result hashes with a TTL (--result-ttl-s) may be evicted "
                        "early; the streams have no TTL and are safe")
    if cluster and keys.hash_tag is None:
        raise RedisSetupError(f"on a Redis Cluster the key prefix must carry a hash tag so every key of an upload "
                              f"lives in one slot: use --prefix '{{{keys.prefix.rstrip(':')}}}:' instead of "
                              f"{keys.prefix!r}")
    try:  # scripts on danmul's keys: an ACL that forbids a command fails here, not mid-stream
        denied = client.eval(_PROBE_LUA, 2, keys.uploads, f"{keys.prefix}probe")
    except AUTH_ERRORS as e:
        raise RedisSetupError(f"the Redis user may not use danmul's keys or commands ({e}): it needs the "
                              f"stream, hash and scripting commands on {keys.prefix}*") from None
    if denied:
        raise RedisSetupError(f"the Redis user may not run {', '.join(_text(d).upper() for d in denied)} on "
                              f"{keys.prefix}*: danmul's scripts need them")
    if not client.eval("return type(redis.pcall('INFO', 'server')) == 'string' and 1 or 0", 0):
        raise RedisSetupError(NEEDS_INFO)
    if not cluster and (warning := replay_warning(client, keys)):
        warnings.append(warning)
    kinds = {keys.uploads: "stream", keys.results: "stream", keys.dead: "stream", keys.attempts: "hash",
             keys.done: "zset", keys.state: "hash"}  # fmt: skip
    for key, kind in kinds.items():
        found = _text(client.type(key))
        if found not in ("none", kind):
            raise RedisSetupError(f"{key} holds a {found}, not a {kind}: danmul cannot write there. Rename or "
                                  "delete it, or choose another --prefix")
    if group is not None and found_stream(client, keys):
        others = [_text(g["name"]) for g in client.xinfo_groups(keys.uploads) if _text(g["name"]) != group]
        if others and not allow_other_groups:
            raise RedisSetupError(
                f"{keys.uploads} is read by other consumer group(s) {others}: two taggers' groups on one prefix "
                "share its ledger (each would acknowledge, untagged, what the other ended), and any other reader "
                f"holds back trimming. Use --group {others[0]!r}, remove the old group (XGROUP DESTROY "
                f"{keys.uploads} NAME), or pass --allow-other-groups if a reader that is not a tagger is meant "
                "to be there")
        if others:
            warnings.append(f"other consumer group(s) {others} read {keys.uploads}: the stream is trimmed only "
                            "below what every group has read")
    return warnings


# What danmul's scripts write, as Redis logs their effects: the commands an append-only file replays inside
# MULTI/EXEC blocks, checked against the default user's permissions by replay_warning.
_REPLAYED = (("XADD", "{dead}", "*", "f", "v"), ("XACK", "{uploads}", "g", "0-1"),
             ("XCLAIM", "{uploads}", "g", "c", "0", "0-1"), ("XTRIM", "{uploads}", "MINID", "0-1"),
             ("XGROUP", "SETID", "{uploads}", "g", "0-1"), ("HSET", "{done}", "f", "v"), ("HDEL", "{done}", "f"),
             ("DEL", "{result}"), ("PEXPIREAT", "{result}", "1"))  # fmt: skip


def replay_warning(client, keys: Keys) -> str | None:
    """A warning when this Redis would drop danmul's writes as it replays its append-only file, else None.
    Redis 7.0-7.4 (and later releases without the fix of redis/redis#14541; Valkey until valkey#3983) replay
    the file as the default user and re-check that user's permissions at every EXEC: plain commands replay,
    MULTI/EXEC blocks (every script that wrote more than one command) are dropped, each with a CRITICAL log
    line. Says nothing when the user may not look (CONFIG GET, ACL DRYRUN) or the file is off."""
    try:
        aof = client.config_get("appendonly")
        if _text(aof.get("appendonly", aof.get(b"appendonly", ""))) != "yes":
            return None
        names = {"uploads": keys.uploads, "dead": keys.dead, "done": keys.done, "result": keys.result(0)}
        denied = []
        for command in _REPLAYED:
            answer = _text(client.execute_command("ACL", "DRYRUN", "default", *(a.format(**names) for a in command)))
            if answer != "OK":
                denied.append(command[0])
    except (redis.ResponseError, *AUTH_ERRORS):
        return None
    if not denied:
        return None
    return (f"this Redis replays its append-only file as the default user, which may not run {', '.join(denied)} "
            f"on {keys.prefix}*: on Redis 7.0-7.4 a restart would drop every multi-command write of danmul "
            "(results, acknowledgements, trims) and keep the rest (redis/redis#14541). danmul recovers the uploads "
            "this leaves behind, but tags them again; keep the default user off and give it every permission: "
            "'user default off ~* &* +@all' in the ACL file (ACL SETUSER default off ~* &* +@all), then "
            "BGREWRITEAOF before the next restart (else that restart replays the blocks this one dropped on top "
            "of what came since); see docs/security.md")


def found_stream(client, keys: Keys) -> bool:
    return _text(client.type(keys.uploads)) == "stream"


# -- one-round-trip commands (sync or async client) -------------------------------------------------------
def enqueue(client, keys: Keys, post_id: int | str | None, image_uri: str | None = None,
            image: bytes | None = None, tags: str | list[str] | None = None,
            max_image_bytes: int | None = INLINE_IMAGE_MAX, **extra: str):
    """``XADD`` one upload; returns its entry id (or an awaitable for an async client). An inline image
    over ``max_image_bytes`` is refused here (``ValueError``), before it reaches Redis: the tagger would
    only dead-letter it (pass such an image by ``image_uri``). ``None`` lifts the check (tests)."""
    if image is not None and max_image_bytes is not None and len(image) > max_image_bytes:
        raise ValueError(f"inline image of {len(image):,} bytes for post {post_id} is over the "
                         f"{max_image_bytes:,}-byte limit: store it and pass its image_uri instead")
    fields: dict[str, Any] = {}
    if post_id is not None:
        fields["post_id"] = str(post_id)
    if image_uri is not None:
        fields["image_uri"] = image_uri
    if image is not None:
        fields["image"] = image
    if tags:
        fields["tags"] = tags if isinstance(tags, str) else " ".join(tags)
    fields.update(extra)
    return client.xadd(keys.uploads, fields)


def decode_fields(raw: Mapping) -> dict[str, bytes]:
    """Stream fields as returned by redis-py (bytes keys) -> ``{str: bytes}``."""
    return {(k.decode("utf-8", "replace") if isinstance(k, bytes) else k): (v if isinstance(v, bytes) else
            str(v).encode()) for k, v in raw.items()}  # fmt: skip


def entry_ms(entry_id: bytes | str) -> int:
    """The Redis clock, in ms, at which a stream entry was added (the first half of its id)."""
    return int(_id(entry_id).split("-", 1)[0])


def _id(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class GroupStats:
    pending: int  # delivered to a consumer, not yet acknowledged
    lag: int  # entries not yet delivered to any consumer (Redis 7+); -1 when Redis cannot tell
    consumers: int
    length: int = 0  # entries in the uploads stream (acknowledged history included)
    # something other than the tagger deleted entries the group had not read yet (XTRIM/XDEL by hand,
    # XADD ... MAXLEN): those uploads are gone without a trace
    undelivered_deleted: bool = False


@dataclass
class DeadLettered:
    """An upload a script dead-lettered by itself (too large to read, delivered too often, deleted)."""

    entry_id: str
    reason: str
    detail: str


@dataclass
class Delivery:
    """What one read or reclaim brought: uploads to work on, uploads the script ended as dead letters, and how
    many it acknowledged because they had already ended (their outcome was written while Redis had forgotten
    their delivery)."""

    uploads: list[Upload] = field(default_factory=list)
    dead: list[DeadLettered] = field(default_factory=list)
    ended: int = 0
    lag_corrected: int = 0  # a read that found nothing waiting set the group's lag from this to 0


class Ended(int):
    """What a script that ends an upload did: ``WRITTEN``; ``SUPERSEDED`` (the results entry written, the result
    hash kept: it holds a newer upload's result); ``ALREADY`` (another delivery had ended it: nothing written);
    ``GONE`` (the entry is no longer in the stream and the ledger does not know it: it ended and was trimmed,
    was deleted, or Redis lost it; nothing written). ``recovered``: the upload was no longer pending because
    Redis had forgotten its delivery, and its outcome was written all the same. True when something was
    written."""

    ALREADY, WRITTEN, SUPERSEDED, GONE = 0, 1, 2, 3
    recovered: bool

    def __new__(cls, status: int, recovered: bool = False) -> Ended:
        obj = super().__new__(cls, status)
        obj.recovered = bool(recovered)
        return obj

    def __bool__(self) -> bool:
        return self in (Ended.WRITTEN, Ended.SUPERSEDED)


@dataclass
class Trimmed:
    """What a trim did: uploads trimmed, results and dead letters over their caps removed, and whether a cap ran
    out of its budget (trim again soon)."""

    uploads: int
    results: int = 0
    dead: int = 0
    more: bool = False


@dataclass
class Audit:
    """Where the audit of forgotten deliveries stands (see ``_AUDIT_LUA``): the Redis run it last saw, its
    cursor, and whether it is caught up."""

    run_id: str = ""
    cursor: str = "-"
    caught_up: bool = False


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _fields(flat: list) -> dict[str, bytes]:
    """A Lua reply's flat [name, value, ...] -> ``{str: bytes}`` (a repeated name keeps its first value)."""
    out: dict[str, bytes] = {}
    for i in range(0, len(flat) - 1, 2):
        out.setdefault(_text(flat[i]), flat[i + 1] if isinstance(flat[i + 1], bytes) else str(flat[i + 1]).encode())
    return out


def _dead(reply: list) -> list[DeadLettered]:
    return [DeadLettered(_text(i), _text(r), _text(d)) for i, r, d in reply]


@dataclass
class AsyncUploadQueue:
    """The consumer side of the protocol, on an asyncio client (a Redis or a Redis Cluster one)."""

    client: Any
    keys: Keys = field(default_factory=Keys)
    group: str = DEFAULT_GROUP
    consumer: str = "consumer"
    results_maxlen: int = RESULTS_MAXLEN
    dead_maxlen: int = DEAD_MAXLEN
    result_ttl_s: int = 0  # 0: result hashes never expire
    max_entry_bytes: int = MAX_ENTRY_BYTES

    def __post_init__(self) -> None:
        self._complete = self.client.register_script(_COMPLETE_LUA)
        self._dead = self.client.register_script(_DEAD_LUA)
        self._read = self.client.register_script(_READ_LUA)
        self._claim = self.client.register_script(_CLAIM_LUA)
        self._trim = self.client.register_script(_TRIM_LUA)
        self._touch = self.client.register_script(_TOUCH_LUA)
        self._audit = self.client.register_script(_AUDIT_LUA)
        self._forget = self.client.register_script(_FORGET_LUA)
        self._ensure = self.client.register_script(_ENSURE_LUA)
        self._cursor = "0-0"  # XAUTOCLAIM's: each reclaim continues the scan where the last one stopped
        self.audit_state = Audit()

    @property
    def _io_keys(self) -> list[str]:
        """The keys of the scripts that read and end uploads."""
        return [self.keys.uploads, self.keys.dead, self.keys.attempts, self.keys.done]

    @property
    def _dead_caps(self) -> list:
        return [DEAD_MAX_FIELDS, DEAD_MAX_VALUE, DEAD_INLINE_IMAGE_MAX]

    async def ensure_group(self) -> None:
        """Create the stream and the group if they do not exist (the group starts at the stream's start,
        so uploads added before the first consumer are processed), and the ledger's starting point."""
        try:
            await self.client.xgroup_create(self.keys.uploads, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        await self._ensure(keys=[self.keys.uploads, self.keys.state, self.keys.done], args=[self.group])

    async def read(self, count: int, budget_bytes: int) -> Delivery:
        """New entries for this consumer: at most ``count``, and no more than one past ``budget_bytes`` of
        entry data. Does not block: an empty Delivery means nothing is waiting. An entry over
        ``max_entry_bytes`` comes back dead-lettered (``too_large``), its body never sent here."""
        args = [self.group, self.consumer, count, self.max_entry_bytes, max(1, budget_bytes), *self._dead_caps]
        try:
            uploads, dead, ended, corrected = await self._read(keys=[*self._io_keys, self.keys.state], args=args)
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):  # the stream or group was deleted (or Redis lost it): recreate
                raise
            await self.ensure_group()
            return Delivery()
        return Delivery([Upload(_text(i), _fields(f), 1, int(n)) for i, f, n in uploads], _dead(dead), int(ended),
                        int(corrected))

    async def reclaim(self, min_idle_ms: int, count: int, budget_bytes: int, max_deliveries: int) -> Delivery:
        """Take over entries pending longer than ``min_idle_ms`` (their consumer died or hung), with their
        delivery counts, continuing the scan where the last call stopped. Entries delivered
        ``max_deliveries`` times already, deleted from the stream while pending, or too large come back
        dead-lettered (see ``_CLAIM_LUA``)."""
        args = [self.group, self.consumer, min_idle_ms, self._cursor, count, self.max_entry_bytes, max(1, budget_bytes),
                max_deliveries, *self._dead_caps]  # fmt: skip
        try:
            cursor, uploads, dead, ended = await self._claim(keys=[*self._io_keys, self.keys.state], args=args)
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            await self.ensure_group()
            return Delivery()
        self._cursor = _text(cursor)
        return Delivery([Upload(_text(i), _fields(f), int(d), int(n)) for i, f, n, d in uploads], _dead(dead),
                        int(ended))

    async def complete(self, upload: Upload, post_id: int, result: Mapping[str, str],
                       summary: Mapping[str, str]) -> Ended:
        """Write the result hash and a ``results`` entry, record the outcome in the ledger, then acknowledge,
        atomically. See :class:`Ended` for what it returns."""
        hash_fields = [x for kv in result.items() if kv[0] != "upload_id" for x in kv]
        entry = [x for kv in {"post_id": str(post_id), "upload_id": upload.entry_id, **summary}.items() for x in kv]
        args = [self.group, upload.entry_id, self.result_ttl_s, len(hash_fields), *hash_fields,
                len(entry), *entry]  # fmt: skip
        keys = [self.keys.uploads, self.keys.result(post_id), self.keys.results, self.keys.attempts, self.keys.done]
        status, recovered = await self._complete(keys=keys, args=args)
        return Ended(int(status), bool(int(recovered)))

    async def dead_letter(self, upload: Upload | str, reason: str, detail: str = "") -> Ended:
        """Move an upload to the dead-letter stream with its reason, record it in the ledger, then acknowledge,
        atomically. The script copies the upload's fields from the stream itself (capped in number and size),
        so this works by id alone. See :class:`Ended` for what it returns (false when nothing was written)."""
        entry_id = upload.entry_id if isinstance(upload, Upload) else upload
        args = [self.group, entry_id, reason, detail[:DEAD_MAX_DETAIL], DEAD_MAX_FIELDS,
                DEAD_MAX_VALUE, DEAD_INLINE_IMAGE_MAX]  # fmt: skip
        status, recovered = await self._dead(keys=self._io_keys, args=args)
        return Ended(int(status), bool(int(recovered)))

    async def record_attempt(self, entry_id: str, reason: str) -> None:
        """Remember why an upload's delivery left it pending; its dead letter names the last such reason
        if it never succeeds (and ``replica_died`` or nothing at all makes it ``poison``)."""
        await self.client.hset(self.keys.attempts, entry_id, reason)

    async def touch(self, entry_ids: list[str]) -> tuple[int, list[str]]:
        """Tell the group these uploads are still being worked on (reset their idle time). Returns how many
        were still this consumer's, and the ids of those deleted from the stream meanwhile (now ended as
        ``deleted`` dead letters: the work on them is moot)."""
        if not entry_ids:
            return 0, []
        keys = [self.keys.uploads, self.keys.dead, self.keys.attempts, self.keys.state]
        n, gone = await self._touch(keys=keys, args=[self.group, self.consumer, *self._dead_caps, *entry_ids])
        return int(n), [_text(i) for i in gone]

    async def trim(self, keep_s: float, cap_entries: int = CAP_MAX_ENTRIES, cap_bytes: int = CAP_MAX_BYTES) -> Trimmed:
        """Trim ended uploads older than ``keep_s`` from the head of the stream: never one a group still needs,
        and only below what this queue's :meth:`audit` has walked in this run of Redis (call it first; the
        consumer does), and cap the results and dead-letter streams at ``results_maxlen`` and ``dead_maxlen``
        (reading at most ``cap_entries`` and about ``cap_bytes`` of their oldest entries)."""
        st = self.audit_state
        keys = [self.keys.uploads, self.keys.done, self.keys.state, self.keys.results, self.keys.dead]
        args = [int(keep_s * 1000), st.run_id or "none", "+" if st.caught_up else st.cursor, self.results_maxlen,
                self.dead_maxlen, cap_entries, cap_bytes]  # fmt: skip
        trimmed, results, dead, more = await self._trim(keys=keys, args=args)
        return Trimmed(int(trimmed), int(results), int(dead), bool(int(more)))

    async def audit(self, max_entries: int = AUDIT_MAX_ENTRIES, max_bytes: int = AUDIT_MAX_BYTES) -> int:
        """One step of the audit of forgotten deliveries (see ``_AUDIT_LUA``): when Redis is not the run the last
        step saw (restarted, failed over; and at first), walk the group's delivered entries and make those that
        are neither pending nor ended pending again, idle, for the next reclaim. Returns how many it found;
        ``audit_state.caught_up`` says whether the walk is done. When Redis changed, the reclaim's scan starts
        again from the beginning too."""
        st = self.audit_state
        args = [self.group, self.consumer, st.run_id, st.cursor, 1 if st.caught_up else 0, max_entries, max_bytes,
                FORGOTTEN_IDLE_MS]  # fmt: skip
        try:
            run_id, cursor, found, caught_up = await self._audit(
                keys=[self.keys.uploads, self.keys.done, self.keys.state], args=args)
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            await self.ensure_group()
            return 0
        if _text(run_id) != st.run_id:
            self._cursor = "0-0"
        self.audit_state = Audit(_text(run_id), _text(cursor), bool(int(caught_up)))
        return int(found)

    async def forget_consumers(self, max_idle_s: float) -> int:
        """Delete the group's consumers that have nothing pending and were not heard from in ``max_idle_s`` (the
        names of killed or restarted consumers); returns how many."""
        args = [self.group, int(max_idle_s * 1000), self.consumer]
        return int(await self._forget(keys=[self.keys.uploads, self.keys.state], args=args))

    async def stats(self) -> GroupStats:
        """The group's counts (XINFO GROUPS and XLEN only: XINFO STREAM would send the stream's first and
        last entries, which may be the largest ones)."""
        try:
            groups = await self.client.xinfo_groups(self.keys.uploads)
        except redis.ResponseError as e:
            if "no such key" in str(e).lower():
                return GroupStats(0, 0, 0)
            raise
        length = int(await self.client.xlen(self.keys.uploads))
        for g in groups:
            if _text(g["name"]) == self.group:
                lag = g.get("lag")
                # Redis cannot count the lag once entries the group has not read were deleted
                return GroupStats(int(g["pending"]), -1 if lag is None else int(lag), int(g["consumers"]), length,
                                  lag is None and length > 0)  # fmt: skip
        return GroupStats(0, -1, 0, length)


def result_fields(prediction: Mapping[str, Any], processed_at: float | None = None) -> dict[str, str]:
    """A ``Prediction.to_dict()`` -> the result hash's fields (JSON where the value is structured)."""
    return {
        "characters": json.dumps(prediction["characters"]),
        "tags": json.dumps(prediction["tags"]),
        "model": prediction["model"],
        "abstained": "1" if prediction.get("abstained") else "0",
        "processed_at": f"{processed_at if processed_at is not None else time.time():.3f}",
    }


def read_result(client: redis.Redis, keys: Keys, post_id: int | str) -> dict[str, Any] | None:
    """The result hash of a post, decoded (sync client), or None."""
    raw = client.hgetall(keys.result(post_id))
    if not raw:
        return None
    d = {k.decode(): v.decode() for k, v in raw.items()}
    return {**d, "characters": json.loads(d["characters"]), "tags": json.loads(d["tags"])}
