// Shared notes in a browser page or an Electron renderer: one <textarea> bound to a Y.Text of a
// unity_crdt doc, and the list of who else is present, over the local node's y-websocket endpoint.
//
// Where the endpoint is comes from, in this order:
//   1. `window.unityCrdt.config()` (an Electron preload exposes it through contextBridge), or
//   2. the URL fragment: #server=ws://127.0.0.1:PORT&token=TOKEN&doc=notes&name=Ada
//      (a fragment is never sent to the http server that serves the page, so neither is the token).
// Without either, the page shows a small form that fills in the fragment.
//
// Defaults (doc "notes", text root "body", presence {name, cursor}) match demos/tk_notes.py, so
// the page and the Tk app edit the same notes and see each other.
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import { bindTextarea } from './textarea.js'

const $ = (id) => document.getElementById(id)

async function readConfig () {
  if (window.unityCrdt && typeof window.unityCrdt.config === 'function') {
    return await window.unityCrdt.config()
  }
  const params = new URLSearchParams(location.hash.slice(1))
  if (!params.get('server') || !params.get('token')) return null
  return {
    server: params.get('server'),
    token: params.get('token'),
    doc: params.get('doc') || undefined,
    root: params.get('root') || undefined,
    name: params.get('name') || undefined
  }
}

function showForm () {
  $('connect').hidden = false
  $('connect').addEventListener('submit', (event) => {
    event.preventDefault()
    const params = new URLSearchParams()
    for (const key of ['server', 'token', 'doc', 'name']) {
      const value = $('connect').elements[key].value.trim()
      if (value) params.set(key, value)
    }
    location.hash = params.toString()
    location.reload()
  })
}

// What the page shows about the connection; tests read the same data-* attributes.
function trackStatus (provider) {
  const body = document.body.dataset
  body.connects = '0'
  body.failures = '0'
  const show = (status) => {
    body.status = status
    $('status').textContent = status
  }
  show('connecting')
  provider.on('status', ({ status }) => {
    show(status)
    if (status === 'connected') body.connects = String(Number(body.connects) + 1)
  })
  // A refused connection (wrong token, Origin not allowed) closes before it ever opened.
  provider.on('connection-close', (event) => {
    if (event && !provider.wsconnected) body.failures = String(Number(body.failures) + 1)
  })
  provider.on('sync', (synced) => { body.synced = String(synced) })
}

// "line L, col C" of a cursor given in characters (code points), as demos/tk_notes.py shows it.
function where (text, cursor) {
  const chars = [...text]
  if (typeof cursor !== 'number' || cursor < 0 || cursor > chars.length) return ''
  const before = chars.slice(0, cursor).join('')
  const lines = before.split('\n')
  return ` (line ${lines.length}, col ${[...lines[lines.length - 1]].length})`
}

function showPresence (awareness, ytext) {
  const render = () => {
    const list = $('presence')
    const items = []
    const text = ytext.toString()
    for (const [clientId, state] of awareness.getStates()) {
      if (clientId === awareness.clientID || !state) continue
      const name = state.name ?? state.user?.name ?? `client ${clientId}`
      const item = document.createElement('li')
      item.textContent = name + where(text, state.cursor)
      items.push(item)
    }
    items.sort((a, b) => a.textContent.localeCompare(b.textContent))
    list.replaceChildren(...items)
    $('nobody').hidden = items.length > 0
  }
  awareness.on('change', render)
  ytext.observe(render) // a cursor's line and column move with the text
  render()
}

async function main () {
  const config = await readConfig()
  if (!config) {
    showForm()
    return
  }
  const doc = config.doc ?? 'notes'
  const root = config.root ?? 'body'
  const name = config.name ?? 'browser'
  document.title = `${doc} - ${name}`
  $('doc').textContent = doc
  $('me').textContent = name
  $('editor').hidden = false

  const ydoc = new Y.Doc()
  const ytext = ydoc.getText(root)
  // The room name is appended to the server URL unescaped: always encode it.
  const provider = new WebsocketProvider(config.server, encodeURIComponent(doc), ydoc, {
    params: { token: config.token } // browsers cannot send an Authorization header
  })
  trackStatus(provider)
  showPresence(provider.awareness, ytext)
  const textarea = $('text')
  // Cursor positions are published in characters (code points), as the Python side counts.
  const publishCursor = () => {
    const chars = [...textarea.value.slice(0, textarea.selectionStart)].length
    provider.awareness.setLocalState({ name, cursor: chars })
  }
  bindTextarea(ytext, textarea, { onChange: publishCursor })
  for (const ev of ['keyup', 'click', 'select']) textarea.addEventListener(ev, publishCursor)
  publishCursor()
  textarea.focus()
  window.addEventListener('beforeunload', () => provider.destroy())
}

main().catch((err) => {
  $('status').textContent = `error: ${err.message}`
  document.body.dataset.status = 'error'
  throw err
})
