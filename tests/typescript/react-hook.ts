// The README's useBatchProgress example, type-checked (tests/test_typescript.py checks that the
// README shows this same function). In an app the import is your copy of client.js + client.d.ts.
import { useEffect, useState } from "react";
import { type BatchProgress, type ConnectionStatus, ProgressClient } from "../../relay/static/client.js";

export function useBatchProgress(url: string, getToken: () => Promise<string>) {
  const [batches, setBatches] = useState<BatchProgress[]>([]);
  const [status, setStatus] = useState<ConnectionStatus>("connecting");
  useEffect(() => {
    const client = new ProgressClient({ url, getToken, onChange: setBatches, onStatus: setStatus });
    client.connect();
    return () => client.close();
  }, [url, getToken]); // keep getToken stable (useCallback), or every render reconnects
  return { batches, status };
}
