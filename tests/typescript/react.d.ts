// The two React hooks the README's useBatchProgress example uses (types only: no React here).
declare module "react" {
  export function useState<S>(initial: S | (() => S)): [S, (value: S) => void];
  export function useEffect(effect: () => void | (() => void), deps?: readonly unknown[]): void;
}
