// Test driver for tests/interop: real Yjs + y-websocket clients steered over stdin/stdout.
//
// Each stdin line is a JSON command {"re": <n>, "op": "...", ...}; each reply is one stdout
// line {"re": <n>, "ok": true, "value": ...} or {"re": <n>, "ok": false, "error": "..."}.
// Asynchronous happenings (provider status, close codes) are lines {"ev": "...", ...}.
// Text indices here are Yjs indices: UTF-16 code units.
import readline from 'node:readline'
import WebSocket from 'ws'
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'

const clients = new Map() // id -> { doc, text, provider } or { raw: WebSocket }

const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')

// A WebSocket class sending the token as an Authorization header instead of in the URL.
const bearerSocket = (token) => class extends WebSocket {
  constructor (url, protocols) {
    super(url, protocols, { headers: { Authorization: `Bearer ${token}` } })
  }
}

const waitFor = (check, timeoutMs, what) => new Promise((resolve, reject) => {
  const started = Date.now()
  const poll = () => {
    let value
    try { value = check() } catch (err) { reject(err); return }
    if (value !== undefined && value !== false) resolve(value)
    else if (Date.now() - started > timeoutMs) reject(new Error(`timeout waiting for ${what}`))
    else setTimeout(poll, 5)
  }
  poll()
})

const get = (id) => {
  const c = clients.get(id)
  if (!c) throw new Error(`no client ${id}`)
  return c
}

const ops = {
  open ({ id, url, room, token, auth = 'query' }) {
    const doc = new Y.Doc()
    const opts = { WebSocketPolyfill: WebSocket, disableBc: true }
    if (auth === 'header') opts.WebSocketPolyfill = bearerSocket(token)
    else if (token !== undefined) opts.params = { token }
    // The room name is appended to the URL unescaped: escape it so any doc name works.
    const provider = new WebsocketProvider(url, encodeURIComponent(room), doc, opts)
    provider.on('status', ({ status }) => emit({ ev: 'status', id, status }))
    provider.on('sync', (synced) => emit({ ev: 'sync', id, synced }))
    provider.on('connection-close', (event) => {
      if (event) emit({ ev: 'close', id, code: event.code, reason: String(event.reason) })
    })
    provider.on('connection-error', () => emit({ ev: 'connection-error', id }))
    clients.set(id, { doc, text: doc.getText('text'), provider })
    return null
  },
  async wait_synced ({ id, timeout = 5000 }) {
    const { provider } = get(id)
    await waitFor(() => provider.synced, timeout, 'sync')
    return true
  },
  insert ({ id, index, text }) { get(id).text.insert(index, text); return get(id).text.toString() },
  delete ({ id, index, length }) { get(id).text.delete(index, length); return get(id).text.toString() },
  text ({ id }) { return get(id).text.toString() },
  async wait_text ({ id, value, timeout = 5000 }) {
    const { text } = get(id)
    await waitFor(() => text.toString() === value, timeout, `text ${JSON.stringify(value)}`)
    return text.toString()
  },
  set_awareness ({ id, state }) { get(id).provider.awareness.setLocalState(state); return null },
  client_id ({ id }) { return get(id).doc.clientID },
  awareness ({ id }) {
    const { provider, doc } = get(id)
    const out = {}
    for (const [cid, state] of provider.awareness.getStates()) {
      if (cid !== doc.clientID) out[cid] = state
    }
    return out
  },
  async wait_awareness ({ id, count, timeout = 5000 }) {
    // Wait until exactly `count` remote states are visible.
    await waitFor(() => ops.awareness({ id }) && Object.keys(ops.awareness({ id })).length === count,
      timeout, `${count} remote awareness states`)
    return ops.awareness({ id })
  },
  close ({ id }) {
    const c = get(id)
    if (c.provider) c.provider.destroy()
    else c.raw.close()
    clients.delete(id)
    return null
  },
  async raw_open ({ id, url, timeout = 5000 }) {
    const raw = new WebSocket(url)
    raw.binaryType = 'nodebuffer'
    const entry = { raw, received: 0, closed: null }
    clients.set(id, entry)
    raw.on('message', () => { entry.received++ })
    raw.on('close', (code) => { entry.closed = code; emit({ ev: 'close', id, code }) })
    raw.on('error', () => {})
    await waitFor(() => raw.readyState === WebSocket.OPEN || entry.closed !== null, timeout, 'open')
    return raw.readyState === WebSocket.OPEN
  },
  raw_send ({ id, hex }) { get(id).raw.send(Buffer.from(hex, 'hex')); return null },
  async raw_wait_close ({ id, timeout = 5000 }) {
    const entry = get(id)
    await waitFor(() => entry.closed !== null, timeout, 'close')
    return entry.closed
  },
  exit () { setTimeout(() => process.exit(0), 10); return null }
}

readline.createInterface({ input: process.stdin }).on('line', async (line) => {
  let cmd
  try { cmd = JSON.parse(line) } catch { return }
  try {
    const op = ops[cmd.op]
    if (!op) throw new Error(`unknown op ${cmd.op}`)
    emit({ re: cmd.re, ok: true, value: (await op(cmd)) ?? null })
  } catch (err) {
    emit({ re: cmd.re, ok: false, error: String(err && err.message ? err.message : err) })
  }
})
process.stdin.on('end', () => process.exit(0))
